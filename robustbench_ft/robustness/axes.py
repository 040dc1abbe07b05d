"""Axis transforms of accuracy plots (logit, probit, linear) and the clipping that keeps 0 and 1 finite.

Clipping. logit(0) and logit(1) are infinite, and a model can score exactly 0 or 1 on a small
test set. Before transforming, accuracies are clipped to ``[eps, 1 − eps]`` with
``eps = 0.5 / n`` when the test-set size ``n`` is known — half a sample, the usual continuity
correction: the clipped value is the midpoint between the observed count and the next possible
one, so it is as far into the open interval as the data allow and no farther. Without ``n``,
``eps = DEFAULT_EPS = 1e-4`` (half a sample of a 5 000-image test set; ImageNet-scale sets
have 10 000 or more). Interior accuracies are never changed.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

TRANSFORMS = frozenset({"linear", "logit", "probit"})
DEFAULT_EPS = 1e-4


def check_kind(kind: str) -> None:
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown axis transform {kind!r}; choose one of {sorted(TRANSFORMS)}")


def as_accuracy(acc: ArrayLike, what: str = "accuracy") -> np.ndarray:
    """``acc`` as a float array, checked to be finite fractions in [0, 1]."""
    try:
        arr = np.asarray(acc, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be numbers (fractions in [0, 1]), got {acc!r}") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values; every accuracy must be a number in [0, 1]")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        hint = " (these look like percentages; divide by 100)" if arr.max() <= 100.0 and arr.min() >= 0.0 else ""
        raise ValueError(
            f"{what} must be fractions in [0, 1] (87.3 % is 0.873); got values in "
            f"[{arr.min():g}, {arr.max():g}]{hint}"
        )
    return arr


def clip_eps(n: ArrayLike | None = None) -> np.ndarray | float:
    """Half a sample, ``0.5 / n``, where the test-set size is known; ``DEFAULT_EPS`` otherwise."""
    if n is None:
        return DEFAULT_EPS
    n_arr = np.asarray(n, dtype=float)
    if not np.all(np.isfinite(n_arr)) or np.any(n_arr < 1):
        raise ValueError(f"test-set sizes n must be positive counts, got {n!r}")
    return 0.5 / n_arr


def transform(acc: ArrayLike, kind: str = "logit", *, n: ArrayLike | None = None) -> np.ndarray:
    """Accuracy -> axis coordinate (``linear``: unchanged; ``logit``: log-odds; ``probit``: Φ⁻¹).

    Accuracies of exactly 0 or 1 are clipped as the module docstring explains, so the result is
    always finite. ``n`` (scalar or broadcastable to ``acc``) is the test-set size behind each value.
    """
    check_kind(kind)
    arr = as_accuracy(acc)
    if kind == "linear":
        return arr.copy()
    eps = clip_eps(n)
    clipped = np.clip(arr, eps, 1.0 - eps)
    return special.logit(clipped) if kind == "logit" else special.ndtri(clipped)


to_axis = transform  # fit_linear and bootstrap_band take a parameter named `transform`


def inverse_transform(z: ArrayLike, kind: str = "logit") -> np.ndarray:
    """Axis coordinate -> accuracy. logit and probit map every real number into (0, 1); for
    ``linear`` values are clipped to [0, 1], since an extrapolated linear trend can leave the range
    of accuracies that it predicts."""
    check_kind(kind)
    arr = np.asarray(z, dtype=float)
    if kind == "linear":
        return np.clip(arr, 0.0, 1.0)
    return special.expit(arr) if kind == "logit" else special.ndtr(arr)
