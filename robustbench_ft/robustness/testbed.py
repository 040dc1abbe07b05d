"""The ImageNet suite's baseline, fitted to the public ImageNet testbed (Taori et al., NeurIPS 2020).

The testbed (https://github.com/modestyachts/imagenet-testbed) publishes the top-1 accuracy, in
percent, of some 300 models on ImageNet and its shifts as one table, ``robustness_top1s.csv``: a
``model`` column and one column per evaluation setting (``val``, ``imagenet-r``,
``val-on-imagenet-r-classes``, ...; empty where a model was not evaluated). It does not say which
models are trained on ImageNet alone; the testbed's plotting code does (``ModelTypes.STANDARD``), and
that list ships beside this module (``baselines/imagenet-testbed-standard-models.txt``).

The fit follows the testbed's own paper plots: only standard-training models, without the
re-trained ``aws`` / ``batch64`` / class-``subsample`` variants, and only models at least as accurate
as the plots show (55 % on the x column, 75 % for the 200-class ImageNet-R and ImageNet-A subsets);
a shift that covers only some ImageNet classes is fitted against ImageNet accuracy on those classes
(``val-on-imagenet-r-classes``), and the shift average against full ImageNet accuracy, as the
WiSE-FT paper plots it. ImageNet-A is fitted as the testbed's ``plotting/paper_imagenet_a.py`` does:
two independent least-squares lines in logit space, split at 91.86 % ImageNet accuracy on its 200
classes (ResNet-50's, which sits exactly there), ``resnet50`` left out by name (ImageNet-A was
filtered against it, so it scores 0 % by construction). The pieces do not meet at the pivot.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from robustbench_ft.metrics import subset_key
from robustbench_ft.robustness.baseline import SHIFT_AVG, Baseline, FitPoints
from robustbench_ft.robustness.fits import PiecewiseFit, fit_linear, fit_piecewise

SUITE = "imagenet"
REFERENCE = "imagenet"
REFERENCE_COLUMN = "val"
BASELINE_NAME = "imagenet-testbed"
STANDARD_MODELS_FILE = Path(__file__).resolve().parent.parent / "baselines" / "imagenet-testbed-standard-models.txt"
EXCLUDED_NAME_PARTS = ("aws", "batch64", "subsample")
"""Re-trained variants the testbed keeps out of its line fits (and class-subsampled models)."""
CITATION = ("Taori et al., Measuring robustness to natural distribution shifts in image classification, "
            "NeurIPS 2020; https://github.com/modestyachts/imagenet-testbed (robustness_top1s.csv)")


@dataclass(frozen=True)
class ShiftColumns:
    """Where one of our shifts sits in the testbed table."""

    y: str                      # the shift's accuracy column
    x: str                      # the reference accuracy it is plotted against
    min_x: float                # least x (fraction) of a model in the fit, as in the testbed's plots
    subset: bool = False        # x is ImageNet accuracy on the shift's classes only
    pivots: tuple[float, ...] = ()       # x values (fractions) where the trend changes line (a piecewise fit)
    excluded: tuple[str, ...] = ()       # models the testbed's plot of this shift leaves out by name


TESTBED_SHIFTS: dict[str, ShiftColumns] = {
    "imagenetv2-matched-frequency": ShiftColumns("imagenetv2-matched-frequency-format-val", "val", 0.55),
    "imagenet-r": ShiftColumns("imagenet-r", "val-on-imagenet-r-classes", 0.75, subset=True),
    "imagenet-sketch": ShiftColumns("imagenet-sketch", "val", 0.55),
    "objectnet": ShiftColumns("objectnet-1.0-beta", "val-on-objectnet-classes", 0.55, subset=True),
    # plotting/paper_imagenet_a.py @ 0170eec: pivot 91.86 (percent) on val-on-imagenet-a-classes, resnet50 excluded
    "imagenet-a": ShiftColumns("imagenet-a", "val-on-imagenet-a-classes", 0.75, subset=True, pivots=(0.9186,),
                               excluded=("resnet50",)),
}
AVG_MIN_X = 0.55


def read_testbed_csv(path: Path) -> dict[str, dict[str, float]]:
    """model -> column -> accuracy as a fraction; empty cells are left out.

    Refuses, naming the row and column, a table without a ``model`` or ``val`` column, a repeated
    model, and cells that are not percentages in [0, 100]."""
    path = Path(path)
    table: dict[str, dict[str, float]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        for needed in ("model", REFERENCE_COLUMN):
            if needed not in columns:
                raise ValueError(f"{path}: no {needed!r} column; expected the imagenet-testbed robustness_top1s.csv "
                                 f"layout (model,<setting>,...), found columns {columns[:8]}")
        for line, row in enumerate(reader, start=2):
            model = (row.get("model") or "").strip()
            if not model:
                raise ValueError(f"{path}, line {line}: empty model name")
            if model in table:
                raise ValueError(f"{path}, line {line}: model {model!r} appears twice")
            values: dict[str, float] = {}
            for column, cell in row.items():
                if column in (None, "model") or cell is None or not cell.strip():
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    raise ValueError(f"{path}, line {line}, column {column!r}: {cell!r} is not a number") from None
                if not math.isfinite(value) or not 0.0 <= value <= 100.0:
                    raise ValueError(f"{path}, line {line}, column {column!r}: {cell!r} is not a percentage in [0, 100]")
                values[column] = value / 100.0
            table[model] = values
    if not table:
        raise ValueError(f"{path}: no model rows")
    return table


def standard_models(path: Path = STANDARD_MODELS_FILE) -> list[str]:
    """Names in a model list file: one per line; blank lines and ``#`` comments are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise ValueError(f"{path}: lists no model names")
    return names


def _eligible(model: str, standard: set[str]) -> bool:
    return model in standard and not any(part in model.lower() for part in EXCLUDED_NAME_PARTS)


def fit_testbed_baseline(
    csv_path: Path,
    transform: str = "logit",
    *,
    standard: Iterable[str] | None = None,
    name: str = BASELINE_NAME,
) -> Baseline:
    """The ImageNet suite's ``Baseline`` from a ``robustness_top1s.csv``: one fit per shift of
    ``TESTBED_SHIFTS`` the table has, and one for the shift average (models with all five).

    ``standard`` names the standard-training models (default: the shipped list). The stored points
    name their models, so the fit can be audited and drawn without the table."""
    table = read_testbed_csv(csv_path)
    chosen = {m for m in table if _eligible(m, set(standard if standard is not None else standard_models()))}
    if not chosen:
        raise ValueError(f"{csv_path}: none of its models is a standard-training model of the list; "
                         f"is this the imagenet-testbed table (or pass the right model list)?")
    fits, points, avg_shifts = {}, {}, []
    for shift, cols in TESTBED_SHIFTS.items():
        rows = sorted(m for m in chosen if cols.x in table[m] and cols.y in table[m] and table[m][cols.x] >= cols.min_x
                      and m.lower() not in cols.excluded)
        if len(rows) < 3:
            continue
        pts = FitPoints([table[m][cols.x] for m in rows], [table[m][cols.y] for m in rows], models=rows)
        kw = dict(x_dataset=REFERENCE, y_dataset=shift, x_metric=subset_key(shift) if cols.subset else "")
        fits[shift] = (fit_piecewise(pts.x, pts.y, transform, cols.pivots, **kw) if cols.pivots
                       else fit_linear(pts.x, pts.y, transform, **kw))
        points[shift] = pts
        avg_shifts.append(shift)
    if not fits:
        raise ValueError(f"{csv_path}: no shift has 3 or more standard-training models with both columns "
                         f"({', '.join(f'{c.x}/{c.y}' for c in TESTBED_SHIFTS.values())})")
    if len(avg_shifts) == len(TESTBED_SHIFTS):
        ys = [TESTBED_SHIFTS[s].y for s in avg_shifts]
        rows = sorted(m for m in chosen if table[m].get(REFERENCE_COLUMN, 0.0) >= AVG_MIN_X
                      and all(c in table[m] for c in ys))
        if len(rows) >= 3:
            pts = FitPoints([table[m][REFERENCE_COLUMN] for m in rows],
                            [float(np.mean([table[m][c] for c in ys])) for m in rows], models=rows)
            fits[SHIFT_AVG] = fit_linear(pts.x, pts.y, transform, x_dataset=REFERENCE, y_dataset=SHIFT_AVG)
            points[SHIFT_AVG] = pts
    source = (f"{Path(csv_path).name}: {len(chosen)} standard-training models of the ImageNet testbed "
              f"(x = ImageNet accuracy on the shift's classes for {', '.join(s for s, c in TESTBED_SHIFTS.items() if c.subset)})")
    return Baseline(name, SUITE, transform, fits, source, CITATION,
                    avg_shifts if SHIFT_AVG in fits else [], points)


def coefficients(baseline: Baseline) -> dict[str, dict]:
    """The fits as plain numbers (what ``baseline fit`` prints); a piecewise fit lists its pieces."""
    def line(f) -> dict:
        return {"slope": f.slope, "intercept": f.intercept, "r": f.r, "n": f.n, "x": f.x_metric or "top1",
                "transform": f.transform}

    out = {}
    for key, fit in baseline.fits.items():
        if isinstance(fit, PiecewiseFit):
            out[key] = {"pivots": list(fit.pivots), "pieces": [line(p) for p in fit.pieces]}
        else:
            out[key] = line(fit)
    return out
