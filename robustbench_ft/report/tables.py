"""The tables of a report: accuracy, effective robustness, the baseline fit, the optimal α of each curve
(the WiSE-FT paper's Table 3 view) and means over seeds; cells carry their display text and CSS classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from robustbench_ft.results import ResultRecord
from robustbench_ft.robustness.baseline import SHIFT_AVG, Baseline, shift_score
from robustbench_ft.robustness.fits import PiecewiseFit


@dataclass
class Cell:
    """One table cell: display text plus CSS classes (numbers right-aligned, best in bold, ER sign)."""

    text: str
    classes: str = ""
    title: str = ""


@dataclass
class Table:
    columns: list[Cell]
    rows: list[list[Cell]] = field(default_factory=list)


def percent(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"


def er_cell(value: float | None) -> Cell:
    """Effective robustness in percentage points, signed and coloured."""
    if value is None:
        return Cell("—", "num")
    return Cell(f"{100 * value:+.1f}", "num " + ("pos" if value > 0.0005 else "neg" if value < -0.0005 else ""))


def alpha_of(record: ResultRecord) -> float | None:
    a = record.tags.get("alpha")
    return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else None


def metric_label(records: Sequence[ResultRecord], dataset: str) -> str:
    metric = next((r.primary_metric[dataset] for r in records if dataset in r.primary_metric), "top1")
    return dataset if metric == "top1" else f"{dataset} ({metric})"


def model_label(record: ResultRecord) -> str:
    return f"{record.model} ({record.pretrained})"


def accuracy_table(records: Sequence[ResultRecord], reference: str, shifts: list[str],
                    avg_shifts: list[str], *, with_alpha: bool) -> Table:
    with_model = len({model_label(r) for r in records}) > 1  # a model grid: the candidate names repeat
    columns = [Cell("candidate"), *([Cell("model")] if with_model else []), Cell("method"),
               *([Cell("α", "num")] if with_alpha else []),
               Cell(metric_label(records, reference) + " (ref)", "num"),
               *(Cell(metric_label(records, s), "num") for s in shifts),
               Cell("shift avg", "num", "mean over " + ", ".join(avg_shifts))]
    values = [[r.score(d) if d in r.metrics else None for d in (reference, *shifts)]
              + [shift_score(r, SHIFT_AVG, avg_shifts)] for r in records]
    best = [max((v[j] for v in values if v[j] is not None), default=None) for j in range(len(shifts) + 2)]
    table = Table(columns)
    for r, vals in zip(records, values):
        alpha = alpha_of(r)
        row = [Cell(r.label, "name", r.record_id), *([Cell(model_label(r))] if with_model else []),
               Cell(r.method)]
        if with_alpha:
            row.append(Cell("" if alpha is None else f"{alpha:g}", "num"))
        row += [Cell(percent(v), "num" + (" best" if v is not None and v == b and len(records) > 1 else ""))
                for v, b in zip(vals, best)]
        table.rows.append(row)
    return table


def er_table(records: Sequence[ResultRecord], er_by_id: dict[str, dict[str, Any]]) -> tuple[Table | None, str]:
    """Effective robustness (pp) per shift, of the shift average, and the mean over shifts, plus
    the names of the baselines it was measured against (records read from disk may differ)."""
    entries = [(r, er_by_id[r.record_id]) for r in records if er_by_id.get(r.record_id)]
    if not entries:
        return None, ""
    shifts = list(dict.fromkeys(s for _, er in entries for s in er.get("per_shift", {})))
    names = sorted({str(er.get("baseline", "?")) for _, er in entries})
    table = Table([Cell("candidate"), *(Cell(s, "num") for s in shifts), Cell("shift avg", "num"),
                   Cell("mean over shifts", "num")])
    for r, er in entries:
        per = er.get("per_shift", {})
        table.rows.append([Cell(r.label, "name", r.record_id), *(er_cell(per.get(s)) for s in shifts),
                           er_cell(er.get(SHIFT_AVG)), er_cell(er.get("mean_per_shift"))])
    return table, ", ".join(names)


def fit_table(baseline: Baseline) -> Table:
    """One row per line of the baseline: a piecewise fit has one per piece, named by its range of x."""
    table = Table([Cell("fit"), Cell("x → y"), Cell("slope", "num"), Cell("intercept", "num"),
                   Cell("r", "num"), Cell("n", "num")])
    for key, fit in baseline.fits.items():
        if isinstance(fit, PiecewiseFit):
            bounds = [None, *fit.pivots, None]
            pieces = [(f"{key} ({'' if lo is None else f'x ≥ {100 * lo:.2f} %'}"
                       f"{', ' if lo is not None and hi is not None else ''}"
                       f"{'' if hi is None else f'x < {100 * hi:.2f} %'})", piece)
                      for piece, lo, hi in zip(fit.pieces, bounds[:-1], bounds[1:])]
        else:
            pieces = [(key, fit)]
        for name, line in pieces:
            table.rows.append([Cell(name), Cell(f"{line.x_dataset} → {line.y_dataset}"),
                               Cell(f"{line.slope:.4f}", "num"), Cell(f"{line.intercept:+.4f}", "num"),
                               Cell(f"{line.r:.4f}", "num"), Cell(str(line.n), "num")])
    return table


def alpha_gain_table(records: Sequence[ResultRecord], reference: str, shifts: list[str],
                     avg_shifts: list[str]) -> Table | None:
    """The WiSE-FT paper's Table 3 view, per α curve: for each column, the α of the curve's points with the
    best score there and its gain over α = 0.5 (pp). Each column's best α is read off test data, so it
    is an oracle: it shows how much choosing α could win, not a result (the α chosen on val is a row of
    its own). Curves without an α = 0.5 point are left out."""
    columns = [reference, *shifts, *([SHIFT_AVG] if avg_shifts else [])]
    curves: dict[str, dict[float, ResultRecord]] = {}
    for r in records:
        place = r.placement
        if place.curve is not None and place.alpha is not None and place.choice != "val":
            curves.setdefault(place.curve, {})[place.alpha] = r
    table = Table([Cell("curve"), *(Cell(c if c != SHIFT_AVG else "shift avg", "num") for c in columns)])
    for curve, points in curves.items():
        if 0.5 not in points or len(points) < 3:
            continue
        row = [Cell(curve, "name")]
        for column in columns:
            scores = {a: (shift_score(r, SHIFT_AVG, avg_shifts) if column == SHIFT_AVG
                          else r.score(column) if column in r.metrics else None) for a, r in points.items()}
            scores = {a: v for a, v in scores.items() if v is not None}
            if 0.5 not in scores:
                row.append(Cell("—", "num"))
                continue
            best = max(scores, key=lambda a: (scores[a], -a))
            row.append(Cell(f"α={best:g}: {100 * (scores[best] - scores[0.5]):+.1f}", "num"))
        table.rows.append(row)
    return table if table.rows else None


def seeds_table(records: Sequence[ResultRecord], reference: str, shifts: list[str],
                avg_shifts: list[str]) -> Table | None:
    """Mean ± sample std (ddof 1) over seeds of every candidate run at several seeds (its seed group)."""
    groups: dict[str, list[ResultRecord]] = {}
    for r in records:
        groups.setdefault(r.seed_group, []).append(r)
    groups = {k: v for k, v in groups.items() if len({r.seed for r in v}) > 1}
    if not groups:
        return None
    columns = [reference, *shifts, *([SHIFT_AVG] if avg_shifts else [])]
    table = Table([Cell("candidate"), Cell("seeds", "num"),
                   *(Cell(c if c != SHIFT_AVG else "shift avg", "num") for c in columns), Cell("ER avg (pp)", "num")])
    for members in groups.values():
        row = [Cell(members[0].label, "name"), Cell(",".join(str(r.seed) for r in members), "num")]
        for column in columns:
            values = [shift_score(r, SHIFT_AVG, avg_shifts) if column == SHIFT_AVG
                      else r.score(column) if column in r.metrics else None for r in members]
            if any(v is None for v in values):
                row.append(Cell("—", "num"))
            else:
                row.append(Cell(f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}", "num"))
        ers = [(r.effective_robustness or {}).get(SHIFT_AVG) for r in members]
        row.append(Cell("—", "num") if any(e is None for e in ers) else
                   Cell(f"{100 * np.mean(ers):+.1f} ± {100 * np.std(ers, ddof=1):.1f}", "num"))
        table.rows.append(row)
    return table


def analysis_tables(analysis: dict[str, Any]) -> list[tuple[str, Table]]:
    """(curve, table) per α curve of an analysis (``robustbench_ft.analyze``): one row per dataset."""
    out = []
    for curve, parts in analysis.get("curves", {}).items():
        table = Table([Cell("dataset"), Cell("PD %", "num"), Cell("CKAC logits", "num"), Cell("CKAC features", "num"),
                       Cell("zs overrides %", "num"), Cell("zs overridden %", "num"), Cell("δ zs − δ ft", "num"),
                       Cell("above chord", "num"), Cell("best α (gain, pp)", "num")])
        for name, d in parts.get("datasets", {}).items():
            chord = parts.get("chord", {}).get(name, {})
            features = d.get("cka_complement_features")
            table.rows.append([Cell(name, "name"), Cell(f"{100 * d['prediction_diversity']:.1f}", "num"),
                               Cell(f"{d['cka_complement_logits']:.3f}", "num"),
                               Cell("—" if features is None else f"{features:.3f}", "num"),
                               Cell(f"{100 * d['zeroshot_overrides']:.1f}", "num"),
                               Cell(f"{100 * d['zeroshot_overridden']:.1f}", "num"),
                               Cell(f"{d['margin_difference']:+.2f}", "num"),
                               Cell("yes" if chord.get("all_above_chord") else "no" if chord else "—", "num"),
                               Cell(f"{chord['best_alpha']:g} ({100 * chord['best_gain_over_endpoints']:+.1f})"
                                    if chord else "—", "num")])
        out.append((curve, table))
    return out


def robust_table(records: Sequence[ResultRecord]) -> Table | None:
    """Robust accuracy (%) under each perturbation shift, next to the clean accuracy on the same samples.

    No effective robustness here: a perturbation has no baseline trend (docs/perturbations.md)."""
    names = list(dict.fromkeys(p for r in records for p in r.perturbations))
    if not names:
        return None
    first = {p: next(r.perturbations[p] for r in records if p in r.perturbations) for p in names}
    table = Table([Cell("candidate"), Cell("clean (same samples)", "num"),
                   *(Cell(p, "num", _perturbation_title(first[p])) for p in names)])
    for r in records:
        clean = next((e["clean_top1"] for e in r.perturbations.values()), None)
        table.rows.append([Cell(r.candidate, "name", r.record_id), Cell(percent(clean), "num"),
                           *(Cell(percent(r.perturbations[p]["top1"]) if p in r.perturbations else "–", "num")
                             for p in names)])
    return table


def _perturbation_title(entry: dict[str, Any]) -> str:
    what = (f"AutoAttack {entry.get('version')} {entry.get('norm')} eps={entry.get('eps'):.6g}"
            if entry.get("attack") == "autoattack" else f"corruption portfolio, severity {entry.get('severity')}")
    return f"{what}; {entry.get('package')} {entry.get('package_version')}; n = {entry['n']}"
