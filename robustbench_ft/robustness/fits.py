"""Trend lines in transformed accuracy space: least-squares fits, piecewise fits, and their bootstrap bands.

A baseline trend is whatever the testbed fits: one line (:class:`LinearFit`) or lines on consecutive
ranges of x (:class:`PiecewiseFit`, imagenet-testbed's ImageNet-A trend). Both predict, serialise and
are checked the same way, so effective robustness, the report's curve and its band take either.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Union

import numpy as np
from numpy.typing import ArrayLike

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
        """A fit read from a file, every field checked (a NaN slope would make every ER NaN)."""
        if not isinstance(data, dict):
            raise ValueError(f"a linear fit is an object, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "kind"}
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        missing = sorted({"slope", "intercept", "r", "n"} - set(data))
        if unknown or missing:
            raise ValueError(f"a linear fit needs slope, intercept, r and n (and optionally transform, x_dataset, "
                             f"y_dataset, x_metric); unknown {unknown}, missing {missing}")
        for key in ("slope", "intercept", "r"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"fit field {key!r} must be a finite number, got {str(value)[:40]}")
        if not -1.0 <= data["r"] <= 1.0:
            raise ValueError(f"fit field 'r' must be a correlation in [-1, 1], got {data['r']}")
        if isinstance(data["n"], bool) or not isinstance(data["n"], int) or data["n"] < 2:
            raise ValueError(f"fit field 'n' must be a whole number >= 2 (models fitted), got {str(data['n'])[:40]}")
        for key in ("transform", "x_dataset", "y_dataset", "x_metric"):
            if key in data and not isinstance(data[key], str):
                raise ValueError(f"fit field {key!r} must be a string, got {type(data[key]).__name__}")
        fit = cls(**{**data, "slope": float(data["slope"]), "intercept": float(data["intercept"]),
                     "r": float(data["r"])})
        check_kind(fit.transform)
        return fit


@dataclass(frozen=True)
class PiecewiseFit:
    """Lines on consecutive ranges of reference accuracy: piece ``i`` covers ``pivots[i-1] <= x < pivots[i]``.

    Each piece is fitted by least squares on its own models, as imagenet-testbed fits ImageNet-A
    (``plotting/paper_imagenet_a.py``: two ``linregress`` fits in logit space, split at 91.86 %
    ImageNet accuracy on the 200 classes, a model exactly at the pivot in neither). Nothing joins the
    pieces: where the testbed's lines do not meet at the pivot, neither do these, and a prediction at
    the pivot itself uses the upper piece.
    """

    pivots: tuple[float, ...]
    pieces: tuple[LinearFit, ...]

    def __post_init__(self) -> None:
        if len(self.pieces) != len(self.pivots) + 1 or not self.pivots:
            raise ValueError(f"a piecewise fit needs one more piece than pivots, got {len(self.pieces)} pieces and "
                             f"{len(self.pivots)} pivots")
        if list(self.pivots) != sorted(self.pivots) or not all(0.0 < p < 1.0 for p in self.pivots):
            raise ValueError(f"pivots must be ascending accuracies in (0, 1), got {list(self.pivots)}")
        first = self.pieces[0]
        if any((f.transform, f.x_dataset, f.y_dataset, f.x_metric) != (first.transform, first.x_dataset,
                                                                       first.y_dataset, first.x_metric)
               for f in self.pieces):
            raise ValueError("the pieces of a piecewise fit must share transform, datasets and x metric")

    transform = property(lambda self: self.pieces[0].transform)
    x_dataset = property(lambda self: self.pieces[0].x_dataset)
    y_dataset = property(lambda self: self.pieces[0].y_dataset)
    x_metric = property(lambda self: self.pieces[0].x_metric)

    @property
    def n(self) -> int:
        return sum(f.n for f in self.pieces)

    @property
    def r(self) -> float:
        """The pieces' correlations weighted by their model counts (a summary for legends)."""
        return float(sum(f.r * f.n for f in self.pieces) / self.n)

    def piece_of(self, acc_ref: ArrayLike) -> np.ndarray:
        """Index of the piece each reference accuracy falls in."""
        return np.searchsorted(np.asarray(self.pivots), np.asarray(acc_ref, dtype=float), side="right")

    def predict(self, acc_ref: ArrayLike, *, n: ArrayLike | None = None) -> float | np.ndarray:
        acc = np.asarray(acc_ref, dtype=float)
        which = self.piece_of(acc)
        out = np.zeros(acc.shape)
        for i, piece in enumerate(self.pieces):
            mask = which == i
            if mask.any():
                out[mask] = piece.predict(acc[mask], n=None if n is None else np.broadcast_to(n, acc.shape)[mask])
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "piecewise", "pivots": list(self.pivots), "pieces": [p.to_dict() for p in self.pieces]}


Fit = Union[LinearFit, PiecewiseFit]


def fit_from_dict(data: Any) -> Fit:
    """A :class:`LinearFit` or :class:`PiecewiseFit` from its ``to_dict`` form, checked."""
    if isinstance(data, dict) and data.get("kind") == "piecewise":
        pivots, pieces = data.get("pivots"), data.get("pieces")
        if not isinstance(pivots, list) or not isinstance(pieces, list) or not all(
                isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) for p in pivots):
            raise ValueError("a piecewise fit needs 'pivots' (finite numbers) and 'pieces' (linear fits)")
        return PiecewiseFit(tuple(float(p) for p in pivots), tuple(LinearFit.from_dict(p) for p in pieces))
    return LinearFit.from_dict(data)


def fit_piecewise(x_acc: ArrayLike, y_acc: ArrayLike, transform: str, pivots: tuple[float, ...], *,
                  x_n: ArrayLike | None = None, y_n: ArrayLike | None = None, x_dataset: str = "",
                  y_dataset: str = "", x_metric: str = "") -> PiecewiseFit:
    """One least-squares line per range between ``pivots`` (points exactly at a pivot join no piece)."""
    x = np.asarray(x_acc, dtype=float)
    y = np.asarray(y_acc, dtype=float)
    bounds = [-np.inf, *pivots, np.inf]
    pieces = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mask = (x > lo) & (x < hi)
        sub = lambda v: None if v is None else np.asarray(v, dtype=float)[mask]  # noqa: E731
        pieces.append(fit_linear(x[mask], y[mask], transform, x_n=sub(x_n), y_n=sub(y_n), x_dataset=x_dataset,
                                 y_dataset=y_dataset, x_metric=x_metric))
    return PiecewiseFit(tuple(float(p) for p in pivots), tuple(pieces))


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
