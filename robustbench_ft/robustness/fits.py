"""Trend lines in transformed accuracy space: least-squares fits and their bootstrap bands.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    pass
from robustbench_ft.robustness.axes import as_accuracy, check_kind, inverse_transform, to_axis, transform


@dataclass(frozen=True)
class LinearFit:
    """``transform(y) = slope · transform(x) + intercept``, least squares in transformed space."""

    slope: float
    intercept: float
    r: float                 # Pearson correlation in transformed space (0.0 if y is constant, as scipy)
    n: int                   # number of models the line was fitted to
    transform: str = "logit"
    x_dataset: str = ""
    y_dataset: str = ""
    # Key in ``metrics[x_dataset]`` that x is; "" is the dataset's primary metric. A shift that covers
    # only some reference classes is fitted against reference accuracy on those classes (see ``metrics.subset_key``).
    x_metric: str = ""

    def predict(self, acc_ref: ArrayLike, *, n: ArrayLike | None = None) -> float | np.ndarray:
        """Shift accuracy the trend predicts for reference accuracy ``acc_ref`` (accuracy space).
        A float for a scalar input, an array otherwise."""
        z = self.slope * transform(acc_ref, self.transform, n=n) + self.intercept
        out = inverse_transform(z, self.transform)
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LinearFit":
        fit = cls(**data)
        check_kind(fit.transform)
        return fit


def _paired_accuracies(x_acc: ArrayLike, y_acc: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D (x, y) accuracy arrays with at least 3 distinct points and two distinct x."""
    x = as_accuracy(x_acc, "x accuracies")
    y = as_accuracy(y_acc, "y accuracies")
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"x and y accuracies must be 1-D sequences, got shapes {x.shape} and {y.shape}")
    if x.shape != y.shape:
        raise ValueError(f"x and y accuracies differ in length ({x.size} vs {y.size}); pass one (x, y) per model")
    distinct = len(set(zip(x.tolist(), y.tolist())))
    if distinct < 3:
        raise ValueError(
            f"a linear fit needs at least 3 distinct (x, y) points, got {distinct} "
            f"(from {x.size} models); add more baseline models"
        )
    if np.ptp(x) == 0:
        raise ValueError(f"all {x.size} models have the same x accuracy {x[0]:g}; the slope is undefined")
    return x, y


def _least_squares(tx: np.ndarray, ty: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slope, intercept and r along the last axis (vectorised so the bootstrap fits all at once)."""
    dx = tx - tx.mean(axis=-1, keepdims=True)
    dy = ty - ty.mean(axis=-1, keepdims=True)
    sxx = (dx * dx).sum(axis=-1)
    syy = (dy * dy).sum(axis=-1)
    sxy = (dx * dy).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = sxy / sxx
        r = np.where(syy > 0, sxy / np.sqrt(sxx * syy), 0.0)
    intercept = ty.mean(axis=-1) - slope * tx.mean(axis=-1)
    return slope, intercept, np.clip(r, -1.0, 1.0)


def fit_linear(
    x_acc: ArrayLike,
    y_acc: ArrayLike,
    transform: str = "logit",
    *,
    x_n: ArrayLike | None = None,
    y_n: ArrayLike | None = None,
    x_dataset: str = "",
    y_dataset: str = "",
    x_metric: str = "",
) -> LinearFit:
    """Least-squares line through (x, y) accuracies in ``transform`` space (Taori et al. 2020).

    ``x_n`` / ``y_n`` are the test-set sizes used for clipping 0 and 1 (module docstring)."""
    check_kind(transform)
    x, y = _paired_accuracies(x_acc, y_acc)
    tx, ty = to_axis(x, transform, n=x_n), to_axis(y, transform, n=y_n)
    if np.ptp(tx) == 0:  # e.g. 0.99995 and 1.0 both clip to 1 - eps: distinct accuracies, one coordinate
        raise ValueError(f"the {x.size} models' x accuracies ({x.min():g} to {x.max():g}) coincide once 0 and 1 are "
                         f"clipped for the {transform} axis; the slope is undefined; add baseline models")
    slope, intercept, r = _least_squares(tx, ty)
    return LinearFit(float(slope), float(intercept), float(r), int(x.size), transform, x_dataset, y_dataset,
                     x_metric)


def bootstrap_band(
    x_acc: ArrayLike,
    y_acc: ArrayLike,
    transform: str,
    grid: ArrayLike,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    *,
    x_n: ArrayLike | None = None,
    y_n: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise ``level`` interval of the fitted line at reference accuracies ``grid``.

    Models are resampled with replacement (the baseline's uncertainty is which models happened to
    be in the zoo), each resample is fitted, and the band is the percentile interval of the
    predictions at every grid point, returned in accuracy space. Resamples whose x values are all
    equal have no slope and are skipped."""
    check_kind(transform)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot!r}")
    x, y = _paired_accuracies(x_acc, y_acc)
    tx = to_axis(x, transform, n=x_n)
    ty = to_axis(y, transform, n=y_n)
    tgrid = to_axis(grid, transform)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    slope, intercept, _ = _least_squares(tx[idx], ty[idx])
    ok = np.isfinite(slope) & (np.ptp(tx[idx], axis=1) > 0)
    if ok.sum() < 2:
        raise ValueError(f"only {int(ok.sum())} of {n_boot} bootstrap resamples had two distinct x values; "
                         f"raise n_boot or add baseline models")
    pred = slope[ok, None] * tgrid.reshape(1, -1) + intercept[ok, None]
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(pred, [tail, 1.0 - tail], axis=0)
    shape = np.shape(grid)
    return inverse_transform(lo, transform).reshape(shape), inverse_transform(hi, transform).reshape(shape)
