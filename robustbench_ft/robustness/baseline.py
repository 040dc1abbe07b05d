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

from robustbench_ft.util import atomic_write_text

if TYPE_CHECKING:
    from robustbench_ft.results import ResultRecord
from robustbench_ft.metrics import count_key_of, subset_key
from robustbench_ft.robustness.axes import check_kind
from robustbench_ft.robustness.fits import LinearFit, bootstrap_band, fit_linear

SHIFT_AVG = "shift-avg"
"""Key of the fit (and of the effective robustness) for the mean accuracy over the shifts."""
BASELINE_FORMAT = "robustbench-ft-baseline"
BASELINE_SCHEMA_VERSION = 1


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

        fits: dict[str, LinearFit] = {}
        points: dict[str, dict[str, list | None]] = {}
        for key in [*shifts, SHIFT_AVG] if avg_shifts else shifts:
            rows = [r for r in base if shift_score(r, key, avg_shifts) is not None]
            if len(rows) < 3:
                warnings.warn(f"baseline {name!r}: only {len(rows)} baseline model(s) report {key!r}; "
                              f"no fit for it (need 3)", stacklevel=2)
                continue
            # a class-subset shift is fitted on reference accuracy on its classes where every model has it
            sub = subset_key(key)
            x_metric = sub if key != SHIFT_AVG and all(sub in r.metrics[reference] for r in rows) else ""
            pts: dict[str, list | None] = {
                "x": [reference_x(r, x_metric) for r in rows],
                "y": [shift_score(r, key, avg_shifts) for r in rows],
                "x_n": _optional_n([reference_count(r, x_metric) for r in rows]),
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
