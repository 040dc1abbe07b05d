"""A suite's baseline: the trend of models trained on the reference only, one fit per shift and one for the
shift average, fitted from baseline records or stored as a file; the shipped baselines by name.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from robustbench_ft.metrics import count_key_of, subset_key
from robustbench_ft.robustness.axes import check_kind
from robustbench_ft.robustness.fits import Fit, PiecewiseFit, bootstrap_band, fit_from_dict, fit_linear
from robustbench_ft.util import atomic_write_text

if TYPE_CHECKING:
    from robustbench_ft.results import ResultRecord

SHIFT_AVG = "shift-avg"
"""Key of the fit (and of the effective robustness) for the mean accuracy over the shifts."""
BASELINE_FORMAT = "robustbench-ft-baseline"
BASELINE_SCHEMA_VERSION = 1


@dataclass
class FitPoints:
    """The models one fit was made from: their accuracies (fractions), test-set sizes (for clipping 0
    and 1; None where unknown) and names (where known), so a saved baseline can still draw its models
    and its bootstrap band."""

    x: list[float]
    y: list[float]
    x_n: list[float] | None = None
    y_n: list[float] | None = None
    models: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("x", "y", "x_n", "y_n"):
            values = getattr(self, name)
            if values is None and name in ("x_n", "y_n"):
                continue
            if not isinstance(values, list) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values):
                raise ValueError(f"fit points {name!r} must be a list of finite numbers")
            if len(values) != len(self.x):
                raise ValueError(f"fit points {name!r} has {len(values)} values for {len(self.x)} models")
        if not all(0.0 <= v <= 1.0 for v in (*self.x, *self.y)):
            raise ValueError("fit points must be accuracies in [0, 1] (fractions)")
        if self.models is not None and (not isinstance(self.models, list) or len(self.models) != len(self.x)
                                        or not all(isinstance(m, str) for m in self.models)):
            raise ValueError("fit points 'models' must be one name (string) per model")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None or k in ("x_n", "y_n")}

    @classmethod
    def from_dict(cls, data: Any) -> "FitPoints":
        if not isinstance(data, dict) or not {"x", "y"} <= set(data) or set(data) - {"x", "y", "x_n", "y_n", "models"}:
            raise ValueError("fit points are an object with 'x' and 'y' (and optionally 'x_n', 'y_n', 'models')")
        return cls(**data)


def reference_x(record: "ResultRecord", x_metric: str = "") -> float | None:
    """The record's reference score, or its ``x_metric`` entry of the reference's metrics; None
    where it lacks it."""
    if not x_metric:
        return record.reference_score if record.reference in record.metrics else None
    value = record.metrics.get(record.reference, {}).get(x_metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def fit_x(record: "ResultRecord", fit: Fit) -> float | None:
    """The record's x for ``fit`` (``reference_x`` of the fit's ``x_metric``). None where the
    record lacks it or has another reference: then it has no place on that trend."""
    if fit.x_dataset and fit.x_dataset != record.reference:
        return None
    return reference_x(record, fit.x_metric)


def _metric_n(record: "ResultRecord", dataset: str, key: str = "n") -> float | None:
    n = record.metrics.get(dataset, {}).get(key)
    return float(n) if isinstance(n, (int, float)) and n >= 1 else None


def reference_count(record: "ResultRecord", x_metric: str) -> float | None:
    """Test-set size behind ``reference_x`` (the class subset's own count for a subset metric)."""
    return _metric_n(record, record.reference, count_key_of(x_metric) if x_metric else "n")


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

    A fit is a line or lines on ranges of x (:class:`~robustbench_ft.robustness.fits.PiecewiseFit`).
    ``points`` keeps the models each fit was made from (:class:`FitPoints`); a baseline copied from a
    paper may carry coefficients only."""

    name: str
    suite: str
    transform: str
    fits: dict[str, Fit]
    source: str
    citation: str = ""
    avg_shifts: list[str] = field(default_factory=list)
    points: dict[str, FitPoints] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_kind(self.transform)
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
        """Bootstrap band of fit ``key`` from the stored points (see ``bootstrap_band``); for a piecewise
        fit, each piece's band from its own models, on its own range of the grid."""
        pts = self.points.get(key)
        if not pts:
            raise KeyError(f"baseline {self.name!r} stores no model accuracies for {key!r}; no band can be computed")
        fit = self.fits[key]
        grid = np.asarray(grid, dtype=float)
        if not isinstance(fit, PiecewiseFit):
            return bootstrap_band(pts.x, pts.y, self.transform, grid, n_boot, level, seed, x_n=pts.x_n, y_n=pts.y_n)
        lo, hi = np.full(grid.shape, np.nan), np.full(grid.shape, np.nan)
        x = np.asarray(pts.x)
        bounds = [-np.inf, *fit.pivots, np.inf]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            on_grid = fit.piece_of(grid) == i
            members = (x > a) & (x < b)
            if on_grid.any():
                pick = lambda v: None if v is None else list(np.asarray(v)[members])  # noqa: E731
                lo[on_grid], hi[on_grid] = bootstrap_band(x[members], np.asarray(pts.y)[members], self.transform,
                                                          grid[on_grid], n_boot, level, seed,
                                                          x_n=pick(pts.x_n), y_n=pick(pts.y_n))
        return lo, hi

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
        check_kind(transform)
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

        fits: dict[str, Fit] = {}
        points: dict[str, FitPoints] = {}
        for key in [*shifts, SHIFT_AVG] if avg_shifts else shifts:
            rows = [r for r in base if shift_score(r, key, avg_shifts) is not None]
            if len(rows) < 3:
                warnings.warn(f"baseline {name!r}: only {len(rows)} baseline model(s) report {key!r}; "
                              f"no fit for it (need 3)", stacklevel=2)
                continue
            # a class-subset shift is fitted on reference accuracy on its classes where every model has it
            sub = subset_key(key)
            x_metric = sub if key != SHIFT_AVG and all(sub in r.metrics[reference] for r in rows) else ""
            pts = FitPoints([reference_x(r, x_metric) for r in rows], [shift_score(r, key, avg_shifts) for r in rows],
                            _optional_n([reference_count(r, x_metric) for r in rows]),
                            _optional_n([_shift_n(r, key, avg_shifts) for r in rows]),
                            [r.candidate for r in rows])
            fits[key] = fit_linear(pts.x, pts.y, transform, x_n=pts.x_n, y_n=pts.y_n, x_dataset=reference,
                                   y_dataset=key, x_metric=x_metric)
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
            "fits": {k: f.to_dict() for k, f in self.fits.items()},
            "points": {k: p.to_dict() for k, p in self.points.items()},
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
            for key in ("name", "suite", "transform"):
                if not isinstance(data.get(key), str):
                    raise ValueError(f"field {key!r} must be a string")
            if not isinstance(data.get("fits"), dict) or not isinstance(data.get("points", {}), dict):
                raise ValueError("'fits' and 'points' must be objects keyed by shift")
            if not isinstance(data.get("avg_shifts", []), list):
                raise ValueError("'avg_shifts' must be a list of shift names")
            fits, points = {}, {}
            for key, value in data["fits"].items():
                try:
                    fits[key] = fit_from_dict(value)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"fit {key!r}: {exc}") from None
            for key, value in data.get("points", {}).items():
                try:
                    points[key] = FitPoints.from_dict(value)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"points {key!r}: {exc}") from None
            return cls(data["name"], data["suite"], data["transform"], fits, str(data.get("source", "")),
                       str(data.get("citation", "")), list(data.get("avg_shifts", [])), points)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: not a valid baseline file ({exc})") from None

    def save(self, path: Path) -> Path:
        atomic_write_text(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "Baseline":
        path = Path(path)
        return cls.from_json(path.read_text(encoding="utf-8"), source=str(path))


BASELINES_DIR = Path(__file__).resolve().parent.parent / "baselines"
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
