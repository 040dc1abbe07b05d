"""Effective robustness (Taori et al., NeurIPS 2020): how far above its baseline trend a classifier sits.

``ρ(f) = acc_shift(f) − β(acc_ref(f))``, in accuracy units (fractions: 0.05 is 5 percentage points).
A model on the line (ρ = 0) is exactly as robust as its reference accuracy predicts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from robustbench_ft.results import ResultRecord
from robustbench_ft.robustness.axes import as_accuracy
from robustbench_ft.robustness.baseline import SHIFT_AVG, Baseline, fit_x, reference_count, shift_score
from robustbench_ft.robustness.fits import Fit


def effective_robustness(fit: Fit, acc_ref: float, acc_shift: float, *,
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
            per_shift[shift] = effective_robustness(fit, x, record.score(shift), n_ref=reference_count(record, fit.x_metric))
    avg = None
    if SHIFT_AVG in baseline.fits:
        fit = baseline.fits[SHIFT_AVG]
        y, x = shift_score(record, SHIFT_AVG, baseline.avg_shifts), fit_x(record, fit)
        if y is not None and x is not None:
            avg = effective_robustness(fit, x, y, n_ref=reference_count(record, fit.x_metric))
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
