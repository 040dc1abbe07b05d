"""One self-contained HTML page per run: figures, accuracy and effective-robustness tables.

``index.html`` inlines every figure as a base64 PNG, and its CSS, so the page can be mailed or
opened offline as a single file; ``figures/<name>.png`` and ``.svg`` sit beside it for papers.
The template autoescapes everything and never marks user text safe: candidate names, methods,
tags and config values come from result files anyone can write.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import jinja2

from robustbench_ft.report.figures import figure_bytes, scatter_figure, training_figure
from robustbench_ft.report.tables import (
    accuracy_table,
    alpha_gain_table,
    alpha_of,
    analysis_tables,
    er_table,
    fit_table,
    model_label,
    percent,
    robust_table,
    seeds_table,
)
from robustbench_ft.results import ResultRecord, now_iso
from robustbench_ft.robustness.baseline import SHIFT_AVG, Baseline, shift_score
from robustbench_ft.robustness.effective import compute_effective_robustness
from robustbench_ft.util import atomic_write_bytes, atomic_write_text, slugify

TEMPLATES = Path(__file__).parent / "templates"
DEFAULT_TITLE = "robustbench-ft report"
MAX_CONFIG_VALUE = 160


@dataclass
class FigureView:
    name: str
    title: str
    data_uri: str


def _sort_key(record: ResultRecord) -> tuple:
    """By model (a grid's records), then curves first (in α order), then everything else by name."""
    curve = record.tags.get("curve")
    alpha = alpha_of(record)
    return (record.model, record.pretrained, not isinstance(curve, str), str(curve or ""),
            alpha if alpha is not None else float("inf"), record.method, record.candidate)


def _single(records: Sequence[ResultRecord], attr: str) -> str:
    values = sorted({getattr(r, attr) for r in records})
    if len(values) != 1:
        raise ValueError(f"a report covers one {attr}; these records mix {values} — render one report per {attr}")
    return values[0]


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows += _flatten(value, name + ".")
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        rows.append((name, text if len(text) <= MAX_CONFIG_VALUE else text[: MAX_CONFIG_VALUE - 1] + "…"))
    return rows


def _skipped_lines(records: Sequence[ResultRecord]) -> list[str]:
    """One line per dataset on which some record skipped unreadable samples: how many, and where."""
    lines = []
    for ds in dict.fromkeys(d for r in records for d in r.skipped_samples):
        entry = max((r.skipped_samples[ds] for r in records if ds in r.skipped_samples),
                    key=lambda e: int(e.get("count", 0)))
        events = [e for e in entry.get("events", []) if isinstance(e, dict)][:5]
        where = ", ".join(f"{e.get('shard')}" + (f":{e['key']}" if e.get("key") else f" ({e.get('count')} samples)")
                          for e in events)
        more = len(entry.get("events", [])) - len(events) + int(entry.get("events_omitted", 0) or 0)
        lines.append(f"{ds}: {int(entry.get('count', 0))} sample(s) skipped" + (f" — {where}" if where else "")
                     + (f" and {more} more place(s)" if more > 0 else ""))
    return lines


def _report_versions() -> dict[str, str]:
    out = {}
    for pkg in ("matplotlib", "jinja2", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _highlights(records: Sequence[ResultRecord], reference: str, avg_shifts: list[str],
                er: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(label, candidate, value) lines for the top of the page."""
    out = []
    scored = [(r.score(reference), r) for r in records if reference in r.metrics]
    if scored:
        v, r = max(scored, key=lambda t: t[0])
        out.append((f"best {reference} (reference) accuracy", r.candidate, f"{percent(v)} %"))
    scored = [(y, r) for r in records if (y := shift_score(r, SHIFT_AVG, avg_shifts)) is not None]
    if scored:
        v, r = max(scored, key=lambda t: t[0])
        out.append(("best shift-average accuracy", r.candidate, f"{percent(v)} %"))
    scored = [(e[SHIFT_AVG], r) for r in records if (e := er.get(r.record_id)) and e.get(SHIFT_AVG) is not None]
    if scored:
        v, r = max(scored, key=lambda t: t[0])
        out.append(("highest effective robustness (shift avg)", r.candidate, f"{100 * v:+.1f} pp"))
    return out


def _write_figures(records: Sequence[ResultRecord], keys: list[str], fig_dir: Path, *, avg_shifts: list[str],
                   baseline: Baseline | None, kind: str, n_boot: int) -> list[FigureView]:
    """One scatter plot per key, written as ``fig_dir/<name>.png|svg`` and returned for inlining."""
    figures: list[FigureView] = []
    used: set[str] = set()
    for key in keys:
        fig_title = f"average over {len(avg_shifts)} shifts" if key == SHIFT_AVG else key
        fig = scatter_figure(records, key, avg_shifts=avg_shifts, baseline=baseline, kind=kind,
                             title=fig_title, n_boot=n_boot)
        png, svg = figure_bytes(fig)
        name = slugify(f"scatter-{key}")
        while name in used:  # two shift names that slugify alike
            name += "-"
        used.add(name)
        atomic_write_bytes(fig_dir / f"{name}.png", png)
        atomic_write_bytes(fig_dir / f"{name}.svg", svg)
        figures.append(FigureView(name, fig_title, "data:image/png;base64," + base64.b64encode(png).decode("ascii")))
    return figures


def _write_training_figures(records: Sequence[ResultRecord], fig_dir: Path) -> list[FigureView]:
    """One figure per distinct fine-tuning curve among the records (a WiSE-FT curve's candidates share one)."""
    figures: list[FigureView] = []
    seen: dict[str, list[str]] = {}
    curves: dict[str, tuple[dict, ResultRecord]] = {}
    for r in records:
        curve = r.training.get("curve") if isinstance(r.training, dict) else None
        if not isinstance(curve, dict) or not curve.get("step"):
            continue
        key = json.dumps(curve, sort_keys=True)
        seen.setdefault(key, []).append(r.candidate)
        curves.setdefault(key, (curve, r))
    for i, (key, (curve, r)) in enumerate(curves.items()):
        facts = r.training
        title = (f"{r.method} on {r.model}: batch {facts.get('global_batch')}, {facts.get('devices')} device(s), "
                 f"{len(curve['step'])} of {facts.get('steps')} steps shown")
        png, svg = figure_bytes(training_figure(curve, title))
        name = f"training-{i}"
        atomic_write_bytes(fig_dir / f"{name}.png", png)
        atomic_write_bytes(fig_dir / f"{name}.svg", svg)
        figures.append(FigureView(name, f"training of {', '.join(seen[key][:4])}",
                                  "data:image/png;base64," + base64.b64encode(png).decode("ascii")))
    return figures


def template_environment() -> jinja2.Environment:
    """The templates of the report and the leaderboard: autoescaped, and a missing variable is an
    error rather than an empty string."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_report(
    records: list[ResultRecord],
    out_dir: Path,
    *,
    baseline: Baseline | None = None,
    title: str = DEFAULT_TITLE,
    n_boot: int = 1000,
    analysis: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/index.html`` (self-contained) and ``out_dir/figures/*.png|svg``; return the page.

    ``records`` are one suite's records: candidates plus, optionally, the baseline models
    (``kind == "baseline"``), drawn as grey dots. Without ``baseline``, one is fitted to those
    baseline records when there are at least three. Every file is written atomically (temporary
    file + rename), the page last, so a reader never sees a half-written report."""
    if not records:
        raise ValueError("no records to report; run an evaluation first or point at a results directory")
    suite, reference = _single(records, "suite"), _single(records, "reference")
    base_records = [r for r in records if r.kind == "baseline"]
    candidates = sorted((r for r in records if r.kind != "baseline"), key=_sort_key)
    if baseline is None and len(base_records) >= 3:
        baseline = Baseline.from_records(base_records, name=f"{suite} baseline records", source="fitted for this report")
    if baseline is not None and baseline.suite != suite:
        raise ValueError(f"baseline {baseline.name!r} is for suite {baseline.suite!r}, the records for {suite!r}")
    kind = baseline.transform if baseline is not None else "logit"

    shifts = list(dict.fromkeys(s for r in [*candidates, *base_records] for s in r.shifts
                                if s != reference and any(s in q.metrics for q in records)))
    avg_shifts = (list(baseline.avg_shifts) if baseline is not None and baseline.avg_shifts
                  else [s for s in shifts if all(s in r.metrics for r in candidates or records)])

    out_dir = Path(out_dir)
    figures = _write_figures(records, [*shifts, SHIFT_AVG] if avg_shifts else shifts, out_dir / "figures",
                             avg_shifts=avg_shifts, baseline=baseline, kind=kind, n_boot=n_boot)
    training = _write_training_figures(candidates, out_dir / "figures")
    # against the report's baseline when there is one, else whatever the records carry
    er_by_id = ({r.record_id: compute_effective_robustness(r, baseline) for r in candidates}
                if baseline is not None else {r.record_id: r.effective_robustness for r in candidates})
    robustness_table, er_baselines = er_table(candidates, er_by_id)
    first = next((r for r in candidates if r.config), candidates[0] if candidates else records[0])
    context = {
        "title": title,
        "generated": now_iso(),
        "suite": suite,
        "reference": reference,
        "shifts": shifts,
        "avg_shifts": avg_shifts,
        "transform": kind,
        "summary": [("suite", suite), ("model", ", ".join(dict.fromkeys(model_label(r) for r in candidates))
                                       or model_label(first)), ("reference", reference),
                    ("shifts", ", ".join(shifts) or "—"), ("candidates", str(len(candidates))),
                    ("baseline models", str(len(base_records)) if base_records else "—"),
                    ("baseline", baseline.name if baseline is not None else "none"),
                    ("axis scale", kind)],
        "highlights": _highlights(candidates, reference, avg_shifts, er_by_id),
        "figures": figures,
        "training": training,
        "accuracy": accuracy_table(candidates, reference, shifts, avg_shifts,
                                    with_alpha=any(alpha_of(r) is not None for r in candidates)) if candidates else None,
        "baseline_accuracy": accuracy_table(sorted(base_records, key=lambda r: r.score(reference)), reference,
                                             shifts, avg_shifts,
                                             with_alpha=False) if base_records else None,
        "skipped": _skipped_lines(candidates),
        "er": robustness_table,
        "er_baselines": er_baselines,
        "baseline": baseline,
        "fits": fit_table(baseline) if baseline is not None else None,
        "alpha_gains": alpha_gain_table(candidates, reference, shifts, avg_shifts),
        "seeds": seeds_table(candidates, reference, shifts, avg_shifts),
        "robust": robust_table(candidates),
        "analysis": analysis_tables(analysis) if analysis else [],
        "config": _flatten(first.config),
        "config_hash": first.config_hash,
        "created": first.created,
        "versions": sorted(first.versions.items()),
        "report_versions": sorted(_report_versions().items()),
    }
    html = template_environment().get_template("report.html.j2").render(**context)
    page = out_dir / "index.html"
    atomic_write_text(page, html)
    return page
