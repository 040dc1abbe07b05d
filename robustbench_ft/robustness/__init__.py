"""Effective robustness against baseline trends (Taori et al. 2020): axes, fits, baselines, the testbed's fit."""
from robustbench_ft.robustness.axes import TRANSFORMS, inverse_transform, transform
from robustbench_ft.robustness.baseline import SHIFT_AVG, Baseline, baseline_records, load_baseline
from robustbench_ft.robustness.effective import (
    attach_effective_robustness,
    compute_effective_robustness,
    effective_robustness,
)
from robustbench_ft.robustness.fits import Fit, LinearFit, PiecewiseFit, bootstrap_band, fit_linear, fit_piecewise

__all__ = ["TRANSFORMS", "transform", "inverse_transform", "SHIFT_AVG", "Baseline", "baseline_records",
           "load_baseline", "attach_effective_robustness", "compute_effective_robustness", "effective_robustness",
           "Fit", "LinearFit", "PiecewiseFit", "bootstrap_band", "fit_linear", "fit_piecewise"]
