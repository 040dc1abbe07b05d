"""The leaderboard rendered: HTML (the report's look and template pieces, autoescaped), Markdown (user text
escaped so it cannot become markup or links) and CSV (fractions, as records store them; text a spreadsheet
would run as a formula is defused). A row over seeds shows mean ± std and how many seeds; an oracle row
(an α of a sweep, whose pick would be made on test data) is marked and unranked.
"""
from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Sequence

from robustbench_ft.board.leaderboard import Board, Entry, shorten
from robustbench_ft.results import now_iso
from robustbench_ft.util import atomic_write_text

FORMATS = ("html", "md", "csv")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _pp(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.1f}"


def _header(board: Board, dataset: str) -> str:
    metric = board.metrics.get(dataset, "top1")
    return dataset if metric == "top1" else f"{dataset} ({metric})"


def _columns(board: Board) -> list[str]:
    return ["rank", "candidate", "kind", "method", "model", f"{_header(board, board.reference)} (ref)",
            *(_header(board, s) for s in board.shifts), *(f"{p} (robust)" for p in board.perturbations),
            "shift avg", "ER (pp)", "source"]


def robust_accuracy(e: Entry, name: str) -> float | None:
    """The row's robust accuracy under perturbation ``name`` (the mean over its seeds' records that have it)."""
    values = [r.perturbations[name]["top1"] for r in e.records if name in r.perturbations]
    return sum(values) / len(values) if values else None


def _numeric_columns(columns: Sequence[str]) -> set[int]:
    """Rank and the score columns (reference … ER): right-aligned, and our own formatting."""
    return {0, *range(5, len(columns) - 1)}


def _with_spread(text: str, e: Entry, key: str) -> str:
    """``text`` and, for a row over seeds, ``± std`` of the column ``key``."""
    std = e.spread.get(key)
    return text if std is None or not text else f"{text} ± {100 * std:.1f}"


def _row_text(board: Board, e: Entry) -> list[str]:
    r = e.record
    avg = _with_spread(_pct(e.shift_avg), e, "shift_avg") + (" †" if e.shift_avg_reported else "")
    seeds = f" ({len(e.records)} seeds)" if len(e.records) > 1 else ""
    rank = str(e.rank) if e.rank else ("oracle" if e.oracle else "—")
    return [rank, r.label + seeds, r.kind, r.method, f"{r.model} ({r.pretrained})",
            _with_spread(_pct(e.reference), e, "reference"),
            *(_with_spread(_pct(e.shifts[s]), e, s) for s in board.shifts),
            *(_pct(robust_accuracy(e, p)) for p in board.perturbations), avg,
            _with_spread(_pp(e.er), e, "er"), e.source]


def _citations(board: Board) -> list[str]:
    """Each published source once, in full (cells show the short form)."""
    return list(dict.fromkeys(f"{e.source_short}: {e.source}" for e in board.entries if e.record.kind == "published"))


def _notes(board: Board) -> list[str]:
    notes = [f"accuracy in %; ranked by shift avg = mean over {', '.join(board.shifts)}" if board.shifts
             else "accuracy in %; ranked by reference accuracy (the suite has no shifts)"]
    if any(e.shift_avg_reported for e in board.entries):
        notes.append("† shift average as the paper reports it (it may give no per-shift numbers, or tune "
                     "each column separately)")
    if board.perturbations:
        notes.append("(robust): accuracy under a perturbed copy of the reference test set (AutoAttack or the corruption "
                     "portfolio; docs/perturbations.md), on the attacked samples; shown, not ranked, and no ER")
    notes.append(f"ER = effective robustness of the shift average in percentage points, against "
                 f"{board.baseline or 'no baseline'}")
    notes += [f"{shorten(e.record.candidate, 60)}: evaluated with unreadable samples left out ({e.record.skipped_note()}); "
              f"its scores are over the samples read" for e in board.entries if e.record.skipped_samples]
    if any(len(e.records) > 1 for e in board.entries):
        notes.append("rows over seeds: mean ± sample standard deviation; ranked by the mean")
    if any(e.oracle and e.rank is None for e in board.entries):
        notes.append("oracle: one α of a sweep; picking the best of them by these scores would be a choice made "
                     "on test data, so they are not ranked (the α chosen on the val split is; "
                     "`leaderboard --include-oracle` ranks them all)")
    if any(e.rank is None and not e.oracle for e in board.entries):
        notes.append("— unranked: no score on every shift" if board.shifts else "— unranked: no reference score")
    return notes


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md_escape(text: str) -> str:
    """User text made inert in a Markdown table cell: HTML characters as entities (Markdown passes
    raw HTML through), the punctuation of emphasis, code, links and cell breaks backslash-escaped,
    line breaks folded (they would end the row). Line-start syntax (#, -, >) cannot occur in a cell."""
    text = " ".join(str(text).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def to_markdown(boards: Sequence[Board]) -> str:
    out = ["# robustbench-ft leaderboard", ""]
    if not boards:
        out.append("No records match.")
    for board in boards:
        out += [f"## {md_escape(board.suite)} (reference: {md_escape(board.reference)})", ""]
        cols = _columns(board)
        numeric = _numeric_columns(cols)
        out.append("| " + " | ".join(md_escape(c) for c in cols) + " |")
        out.append("|" + "|".join("---:" if i in numeric else "---" for i in range(len(cols))) + "|")
        for e in board.entries:
            cells = _row_text(board, e)
            cells[-1] = e.source_short
            out.append("| " + " | ".join(c if i in numeric else md_escape(c) for i, c in enumerate(cells)) + " |")
        out += [""] + [f"- {md_escape(n)}" for n in _notes(board)]
        out += [f"- {md_escape(c)}" for c in _citations(board)] + [""]
    return "\n".join(out).rstrip() + "\n"


def _csv_text(value: str) -> str:
    """Text a spreadsheet would evaluate (=, +, -, @, tab, CR first) gets a leading apostrophe."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def to_csv(boards: Sequence[Board]) -> str:
    """One row per entry across suites; scores as fractions, empty where a record has none."""
    datasets = list(dict.fromkeys(d for b in boards for d in b.shifts))
    robust = list(dict.fromkeys(p for b in boards for p in b.perturbations))  # last, so other columns keep their place
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["suite", "rank", "kind", "candidate", "method", "model", "pretrained", "reference",
                     "reference_score", *datasets, "shift_avg", "shift_avg_reported", "effective_robustness",
                     "baseline", "source", "record_id", "choice", "seeds", "shots", "reference_std", "shift_avg_std",
                     "effective_robustness_std", *(f"robust@{p}" for p in robust)])

    def num(v: float | None) -> str:
        return "" if v is None or not math.isfinite(v) else repr(round(float(v), 6))

    for b in boards:
        for e in b.entries:
            r = e.record
            writer.writerow([_csv_text(x) for x in (b.suite, str(e.rank or ""), r.kind, r.candidate, r.method,
                                                     r.model, r.pretrained, r.reference)]
                            + [num(e.reference), *(num(e.shifts.get(d)) if d in b.shifts else "" for d in datasets),
                               num(e.shift_avg), "yes" if e.shift_avg_reported else "", num(e.er)]
                            + [_csv_text(x) for x in (e.er_baseline, e.source, r.record_id,
                                                      r.placement.choice or "")]
                            + [",".join(map(str, e.seeds)), "" if r.shots is None else str(r.shots),
                               num(e.spread.get("reference")),
                               num(e.spread.get("shift_avg")), num(e.spread.get("er"))]
                            + [num(robust_accuracy(e, p)) for p in robust])
    return buf.getvalue()


def to_html(boards: Sequence[Board], title: str = "robustbench-ft leaderboard") -> str:
    from robustbench_ft.report.html import template_environment
    from robustbench_ft.report.tables import Cell, Table, er_cell

    views = []
    for b in boards:
        cols = _columns(b)
        numeric = _numeric_columns(cols)
        table = Table([Cell(c, "num wrap" if i in numeric else "") for i, c in enumerate(cols)])
        for e in b.entries:
            text = _row_text(b, e)
            cells = [Cell(t, "num" if i in numeric else "") for i, t in enumerate(text)]
            cells[1] = Cell(text[1], "name", e.record.record_id)
            cells[2] = Cell(text[2], f"kind kind-{e.record.kind}")
            cells[4] = Cell(text[4], "nowrap")
            cells[-2] = er_cell(e.er)
            cells[-1] = Cell(e.source_short, "source", e.source)
            if e.shift_avg_reported:
                cells[-3].title = "as reported by the paper"
            table.rows.append(cells)
        views.append({"board": b, "table": table, "notes": _notes(b) + _citations(b)})
    return template_environment().get_template("leaderboard.html.j2").render(
        title=title, generated=now_iso(), boards=views)


def render(boards: Sequence[Board], fmt: str, title: str = "robustbench-ft leaderboard") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown leaderboard format {fmt!r}; choose one of {list(FORMATS)}")
    return {"html": lambda: to_html(boards, title), "md": lambda: to_markdown(boards),
            "csv": lambda: to_csv(boards)}[fmt]()


def format_for(out: Path | None, fmt: str | None) -> str:
    """``fmt`` if given, else from the output file's suffix (.html/.htm, .md, .csv), else Markdown."""
    if fmt:
        return fmt
    suffix = out.suffix.lower().lstrip(".") if out is not None else ""
    return {"htm": "html", "html": "html", "md": "md", "markdown": "md", "csv": "csv"}.get(suffix, "md")


def write_leaderboard(boards: Sequence[Board], out: Path, fmt: str, title: str = "robustbench-ft leaderboard") -> Path:
    atomic_write_text(Path(out), render(boards, fmt, title))
    return Path(out)
