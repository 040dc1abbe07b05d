"""Effective robustness against a baseline trend (Taori et al., NeurIPS 2020).

Models trained on the reference distribution only lie, across architectures and training
recipes, close to one line when reference accuracy is plotted against shift accuracy on
*probit- or logit-scaled* axes. That line β is the baseline; a classifier's effective robustness
is how far above it the classifier sits: ``ρ(f) = acc_shift(f) − β(acc_ref(f))``, in accuracy
units. A model on the line (ρ = 0) is exactly as robust as its reference accuracy predicts, so
gains in ρ are the ones a better reference accuracy alone would not have bought.

Everything here works on fractions in [0, 1] (0.873 = 87.3 %), the unit result records store.

Clipping. logit(0) and logit(1) are infinite, and a model can score exactly 0 or 1 on a small
test set. Before transforming, accuracies are clipped to ``[eps, 1 − eps]`` with
``eps = 0.5 / n`` when the test-set size ``n`` is known — half a sample, the usual continuity
correction: the clipped value is the midpoint between the observed count and the next possible
one, so it is as far into the open interval as the data allow and no farther. Without ``n``,
``eps = DEFAULT_EPS = 1e-4`` (half a sample of a 5 000-image test set; ImageNet-scale sets
have 10 000 or more). Interior accuracies are never changed.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

from robustbench_ft.results import atomic_write_text

if TYPE_CHECKING:
    from robustbench_ft.results import ResultRecord

TRANSFORMS = frozenset({"linear", "logit", "probit"})
DEFAULT_EPS = 1e-4
SHIFT_AVG = "shift-avg"
"""Key of the fit (and of the effective robustness) for the mean accuracy over the shifts."""
BASELINE_FORMAT = "robustbench-ft-baseline"
BASELINE_SCHEMA_VERSION = 1


# --------------------------------------------------------------------------------------------
# Axis transforms
# --------------------------------------------------------------------------------------------

def _check_kind(kind: str) -> None:
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
    _check_kind(kind)
    arr = as_accuracy(acc)
    if kind == "linear":
        return arr.copy()
    eps = clip_eps(n)
    clipped = np.clip(arr, eps, 1.0 - eps)
    return special.logit(clipped) if kind == "logit" else special.ndtri(clipped)


_to_axis = transform  # fit_linear and bootstrap_band take a parameter named `transform`


def inverse_transform(z: ArrayLike, kind: str = "logit") -> np.ndarray:
    """Axis coordinate -> accuracy. logit and probit map every real number into (0, 1); for
    ``linear`` values are clipped to [0, 1], since an extrapolated linear trend can leave the range
    of accuracies that it predicts."""
    _check_kind(kind)
    arr = np.asarray(z, dtype=float)
    if kind == "linear":
        return np.clip(arr, 0.0, 1.0)
    return special.expit(arr) if kind == "logit" else special.ndtr(arr)


# --------------------------------------------------------------------------------------------
# Linear fits
# --------------------------------------------------------------------------------------------

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
    # only some reference classes is fitted against reference accuracy on those classes (see ``subset_metric``).
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
        _check_kind(fit.transform)
        return fit


def subset_metric(shift: str, metric: str = "top1") -> str:
    """Key, inside the reference dataset's metrics, of its ``metric`` restricted to the classes that
    ``shift`` covers (``"top1@imagenet-r"``): the x a class-subset shift's baseline is fitted on, since
    a model is judged on ImageNet-R against its ImageNet accuracy on the same 200 classes."""
    return f"{metric}@{shift}"


def subset_count(x_metric: str) -> str:
    """Key of the sample count behind a class-subset metric (``"top1@imagenet-r"`` -> ``"n@imagenet-r"``)."""
    return "n@" + x_metric.partition("@")[2]


def reference_x(record: "ResultRecord", x_metric: str = "") -> float | None:
    """The record's reference score, or its ``x_metric`` entry of the reference's metrics; None
    where it lacks it."""
    if not x_metric:
        return record.reference_score if record.reference in record.metrics else None
    value = record.metrics.get(record.reference, {}).get(x_metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def fit_x(record: "ResultRecord", fit: LinearFit) -> float | None:
    """The record's x for ``fit`` (``reference_x`` of the fit's ``x_metric``). None where the
    record lacks it or has another reference: then it has no place on that trend."""
    if fit.x_dataset and fit.x_dataset != record.reference:
        return None
    return reference_x(record, fit.x_metric)


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
    _check_kind(transform)
    x, y = _paired_accuracies(x_acc, y_acc)
    tx, ty = _to_axis(x, transform, n=x_n), _to_axis(y, transform, n=y_n)
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
    _check_kind(transform)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot!r}")
    x, y = _paired_accuracies(x_acc, y_acc)
    tx = _to_axis(x, transform, n=x_n)
    ty = _to_axis(y, transform, n=y_n)
    tgrid = _to_axis(grid, transform)
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


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------

def _metric_n(record: "ResultRecord", dataset: str, key: str = "n") -> float | None:
    n = record.metrics.get(dataset, {}).get(key)
    return float(n) if isinstance(n, (int, float)) and n >= 1 else None


def _x_n(record: "ResultRecord", x_metric: str) -> float | None:
    """Test-set size behind ``reference_x`` (the class subset's own count for a subset metric)."""
    return _metric_n(record, record.reference, subset_count(x_metric) if x_metric else "n")


def shift_score(record: "ResultRecord", key: str, avg_shifts: Sequence[str]) -> float | None:
    """The record's y value for fit ``key``: its score on shift ``key``, or for ``SHIFT_AVG`` its
    mean over ``avg_shifts`` (the same shifts the baseline averaged). A mean the record reports
    over exactly those shifts (``summary``: a paper's own average column) comes first — it can
    differ from the mean of the per-shift numbers, e.g. when each column was tuned separately —
    then the mean of the per-shift scores. None where it has neither."""
    if key != SHIFT_AVG:
        return record.score(key) if key in record.metrics else None
    if not avg_shifts:
        return None
    reported = record.summary_score(SHIFT_AVG, avg_shifts)
    if reported is not None:
        return reported
    if all(s in record.metrics for s in avg_shifts):
        return sum(record.score(s) for s in avg_shifts) / len(avg_shifts)
    return None


def _shift_n(record: "ResultRecord", key: str, avg_shifts: Sequence[str]) -> float | None:
    """Test-set size behind ``shift_score`` (for ``SHIFT_AVG``: the pooled size, since a mean of
    accuracies is 0 or 1 only when every shift is)."""
    names = list(avg_shifts) if key == SHIFT_AVG else [key]
    ns = [_metric_n(record, s) for s in names]
    return float(sum(ns)) if ns and all(n is not None for n in ns) else None


def _optional_n(values: list[float | None]) -> list[float] | None:
    return None if any(v is None for v in values) else [float(v) for v in values]  # type: ignore[arg-type]


@dataclass
class Baseline:
    """The trend of one suite's baseline models: one fit per shift plus one (``SHIFT_AVG``) for
    the mean over ``avg_shifts`` — reference accuracy on x, as the WiSE-FT paper plots it.

    ``points`` keeps the accuracies each fit was made from (``{"x": [...], "y": [...], "x_n":
    [...] | None, "y_n": [...] | None}``, optionally ``"models"``: their names), so a saved baseline
    can still draw its models and its bootstrap band; a baseline copied from a paper may carry
    coefficients only."""

    name: str
    suite: str
    transform: str
    fits: dict[str, LinearFit]
    source: str
    citation: str = ""
    avg_shifts: list[str] = field(default_factory=list)
    points: dict[str, dict[str, list | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_kind(self.transform)
        refs = {f.x_dataset for f in self.fits.values()}
        if len(refs) > 1:
            raise ValueError(f"baseline {self.name!r}: fits use different reference datasets {sorted(refs)}")
        if SHIFT_AVG in self.fits and not self.avg_shifts:
            raise ValueError(f"baseline {self.name!r} has a {SHIFT_AVG!r} fit but no avg_shifts naming what it averages")

    @property
    def reference(self) -> str:
        return next(iter(self.fits.values())).x_dataset if self.fits else ""

    @property
    def shifts(self) -> list[str]:
        return [k for k in self.fits if k != SHIFT_AVG]

    def band(self, key: str, grid: ArrayLike, n_boot: int = 1000, level: float = 0.95,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Bootstrap band of fit ``key`` from the stored points (see ``bootstrap_band``)."""
        pts = self.points.get(key)
        if not pts:
            raise KeyError(f"baseline {self.name!r} stores no model accuracies for {key!r}; no band can be computed")
        return bootstrap_band(pts["x"], pts["y"], self.transform, grid, n_boot, level, seed,
                              x_n=pts.get("x_n"), y_n=pts.get("y_n"))

    @classmethod
    def from_records(
        cls,
        records: Iterable["ResultRecord"],
        name: str,
        transform: str = "logit",
        *,
        source: str = "",
        citation: str = "",
    ) -> "Baseline":
        """Fit the trend of the records with ``kind == "baseline"`` (others are ignored).

        Each shift is fitted on the baseline models that report it (a shift with fewer than 3 is
        skipped with a warning); ``SHIFT_AVG`` is fitted on the shifts every baseline model reports."""
        _check_kind(transform)
        base = [r for r in records if r.kind == "baseline"]
        if not base:
            raise ValueError("no records with kind == 'baseline'; a baseline is fitted to reference-only models")
        for attr in ("suite", "reference"):
            values = sorted({getattr(r, attr) for r in base})
            if len(values) > 1:
                raise ValueError(f"baseline records mix {attr}s {values}; fit one baseline per suite")
        suite, reference = base[0].suite, base[0].reference
        missing_ref = [r.record_id for r in base if reference not in r.metrics]
        if missing_ref:
            raise ValueError(f"baseline records {missing_ref} have no score on the reference {reference!r}")
        shifts = list(dict.fromkeys(s for r in base for s in r.shifts if s in r.metrics and s != reference))
        avg_shifts = [s for s in shifts if all(s in r.metrics for r in base)]

        fits: dict[str, LinearFit] = {}
        points: dict[str, dict[str, list | None]] = {}
        for key in [*shifts, SHIFT_AVG] if avg_shifts else shifts:
            rows = [r for r in base if shift_score(r, key, avg_shifts) is not None]
            if len(rows) < 3:
                warnings.warn(f"baseline {name!r}: only {len(rows)} baseline model(s) report {key!r}; "
                              f"no fit for it (need 3)", stacklevel=2)
                continue
            # a class-subset shift is fitted on reference accuracy on its classes where every model has it
            sub = subset_metric(key)
            x_metric = sub if key != SHIFT_AVG and all(sub in r.metrics[reference] for r in rows) else ""
            pts: dict[str, list | None] = {
                "x": [reference_x(r, x_metric) for r in rows],
                "y": [shift_score(r, key, avg_shifts) for r in rows],
                "x_n": _optional_n([_x_n(r, x_metric) for r in rows]),
                "y_n": _optional_n([_shift_n(r, key, avg_shifts) for r in rows]),
            }
            fits[key] = fit_linear(pts["x"], pts["y"], transform, x_n=pts["x_n"], y_n=pts["y_n"],
                                   x_dataset=reference, y_dataset=key, x_metric=x_metric)
            points[key] = pts
        if not fits:
            raise ValueError(f"baseline {name!r}: no shift has 3 or more baseline models; nothing to fit")
        return cls(name, suite, transform, fits, source or f"fitted to {len(base)} baseline records",
                   citation, avg_shifts if SHIFT_AVG in fits else [], points)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BASELINE_FORMAT, "schema_version": BASELINE_SCHEMA_VERSION,
            "name": self.name, "suite": self.suite, "transform": self.transform,
            "source": self.source, "citation": self.citation, "avg_shifts": list(self.avg_shifts),
            "fits": {k: f.to_dict() for k, f in self.fits.items()}, "points": self.points,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> "Baseline":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
            raise ValueError(f"{source}: not a baseline file (expected \"format\": \"{BASELINE_FORMAT}\")")
        if data.get("schema_version") != BASELINE_SCHEMA_VERSION:
            raise ValueError(f"{source}: baseline schema_version {data.get('schema_version')!r} is not "
                             f"supported (expected {BASELINE_SCHEMA_VERSION})")
        try:
            fits = {k: LinearFit.from_dict(v) for k, v in data["fits"].items()}
            return cls(data["name"], data["suite"], data["transform"], fits, data.get("source", ""),
                       data.get("citation", ""), list(data.get("avg_shifts", [])), dict(data.get("points", {})))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{source}: malformed baseline ({exc!r})") from exc

    def save(self, path: Path) -> Path:
        atomic_write_text(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "Baseline":
        path = Path(path)
        return cls.from_json(path.read_text(encoding="utf-8"), source=str(path))


# --------------------------------------------------------------------------------------------
# Stored baselines, by name
# --------------------------------------------------------------------------------------------

BASELINES_DIR = Path(__file__).parent / "baselines"
"""Shipped baselines: ``<name>.json`` (a saved ``Baseline``: coefficients and, usually, the points)
or ``<name>/`` (a directory of baseline-model result records, fitted when loaded)."""


def baseline_path(name: str | Path) -> Path:
    """Where baseline ``name`` lives: ``name`` itself if it is an existing file or directory,
    else ``BASELINES_DIR/<name>.json`` or ``BASELINES_DIR/<name>/``."""
    given = Path(name)
    if given.exists():
        return given
    for candidate in (BASELINES_DIR / f"{name}.json", BASELINES_DIR / str(name)):
        if candidate.exists():
            return candidate
    known = sorted({p.stem for p in BASELINES_DIR.glob("*") if not p.name.startswith(".")
                    and (p.suffix == ".json" or p.is_dir())}) if BASELINES_DIR.is_dir() else []
    raise FileNotFoundError(f"no baseline {str(name)!r}: not a file or directory, and not shipped in {BASELINES_DIR} "
                            f"(shipped: {known or 'none'}); pass a baseline .json or a directory of baseline records")


def baseline_records(name: str | Path) -> list["ResultRecord"]:
    """The baseline models' records behind baseline ``name`` (for drawing them); empty for a
    baseline stored as a fit file, whose stored points the report draws instead."""
    from robustbench_ft.results import load_records

    path = baseline_path(name)
    return [r for r in load_records([path]) if r.kind == "baseline"] if path.is_dir() else []


def load_baseline(name: str | Path, transform: str = "logit") -> Baseline:
    """Baseline ``name`` (see ``baseline_path``); a records directory is fitted in ``transform`` space."""
    path = baseline_path(name)
    if path.is_dir():
        return Baseline.from_records(baseline_records(path), Path(name).name, transform, source=str(path))
    return Baseline.load(path)


# --------------------------------------------------------------------------------------------
# Effective robustness
# --------------------------------------------------------------------------------------------

def effective_robustness(fit: LinearFit, acc_ref: float, acc_shift: float, *,
                         n_ref: float | None = None) -> float:
    """ρ = acc_shift − β(acc_ref), in fraction units (0.05 = 5 percentage points above the trend)."""
    shift = float(as_accuracy(acc_shift, "shift accuracy"))
    return shift - float(fit.predict(acc_ref, n=n_ref))


def compute_effective_robustness(record: "ResultRecord", baseline: Baseline) -> dict[str, Any]:
    """The ``effective_robustness`` entry of a record (see ``attach_effective_robustness``)."""
    if record.suite != baseline.suite:
        raise ValueError(f"record {record.record_id!r} is on suite {record.suite!r} but baseline "
                         f"{baseline.name!r} was fitted on suite {baseline.suite!r}")
    if baseline.reference and record.reference != baseline.reference:
        raise ValueError(f"record {record.record_id!r} uses reference {record.reference!r} but baseline "
                         f"{baseline.name!r} uses {baseline.reference!r}")
    if record.reference not in record.metrics:
        raise ValueError(f"record {record.record_id!r} has no score on its reference {record.reference!r}")
    per_shift: dict[str, float] = {}
    for shift in baseline.shifts:
        fit = baseline.fits[shift]
        x = fit_x(record, fit)
        if shift in record.metrics and x is not None:
            per_shift[shift] = effective_robustness(fit, x, record.score(shift), n_ref=_x_n(record, fit.x_metric))
    avg = None
    if SHIFT_AVG in baseline.fits:
        fit = baseline.fits[SHIFT_AVG]
        y, x = shift_score(record, SHIFT_AVG, baseline.avg_shifts), fit_x(record, fit)
        if y is not None and x is not None:
            avg = effective_robustness(fit, x, y, n_ref=_x_n(record, fit.x_metric))
    missing = [s for s in record.shifts if s not in per_shift]
    if avg is None:
        missing.append(SHIFT_AVG)
    return {
        "baseline": baseline.name,
        "transform": baseline.transform,
        "per_shift": per_shift,
        SHIFT_AVG: avg,
        "mean_per_shift": float(np.mean(list(per_shift.values()))) if per_shift else None,
        "missing": missing,
    }


def attach_effective_robustness(record: "ResultRecord", baseline: Baseline) -> None:
    """Fill ``record.effective_robustness`` with ρ per shift the baseline covers, ρ of the shift
    average, and the mean of the per-shift values; shifts without a fit, a score or the fit's x
    (a class-subset reference accuracy the record lacks), and ``SHIFT_AVG`` when it cannot be
    computed, are listed under ``"missing"``."""
    record.effective_robustness = compute_effective_robustness(record, baseline)
