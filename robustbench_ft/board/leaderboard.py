"""The leaderboard: every record of a suite ranked by its average accuracy under distribution shift.

One board per suite (accuracies on different suites do not compare). Each row is a record —
reproduced by the harness, submitted (``leaderboard --add``) or published (copied from a paper,
marked with its citation) — with its reference accuracy, each shift, the shift average it is ranked
by, and its effective robustness on the shift average against the suite's baseline. Baseline
models are the trend, not contestants, and are left out.

The shift average is over *all* the suite's shifts: the mean a paper reports (FLYP's "IN OOD",
WiSE-FT's "avg shifts"), flagged as such, else the mean of the per-shift scores. A record with
neither is listed unranked rather than ranked on fewer shifts, where a missing hard shift would
flatter it.

Renderings: HTML (the report's look and template pieces, autoescaped), Markdown (user text escaped
so it cannot become markup or links) and CSV (fractions, as records store them; text that a
spreadsheet would run as a formula is defused).
"""
from __future__ import annotations

import csv
import io
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from robustbench_ft.results import ResultRecord, now_iso
from robustbench_ft.robustness.baseline import SHIFT_AVG, Baseline, shift_score
from robustbench_ft.robustness.effective import compute_effective_robustness
from robustbench_ft.util import atomic_write_text

FORMATS = ("html", "md", "csv")
MAX_TEXT = 120


@dataclass
class Entry:
    """One row: the record and the numbers the board shows for it."""

    record: ResultRecord
    rank: int | None
    reference: float | None
    shifts: dict[str, float | None]
    shift_avg: float | None
    shift_avg_reported: bool          # taken from the paper's reported mean, not from per-shift scores
    er: float | None                  # effective robustness of the shift average (fraction)
    er_baseline: str                  # the baseline ``er`` was measured against ("" if none)

    def score(self, shifts: Sequence[str]) -> float | None:
        """What the row is ranked by: the shift average, or reference accuracy in a suite
        without shifts (the transfer suites)."""
        return self.shift_avg if shifts else self.reference

    @property
    def source_short(self) -> str:
        """``source`` abbreviated for a table cell: "Wortsman et al. 2022" for a citation."""
        text = self.source
        if self.record.kind == "published":
            year = re.search(r"\b(19|20)\d\d\b", text)
            return f"{text.split(',')[0]}{' ' + year.group(0) if year else ''}"
        return _short(text, 60)

    @property
    def source(self) -> str:
        """Where the row comes from: the citation of a published entry, the submission's name and
        paper for a submitted one, the start of the run config hash for a reproduced one."""
        r = self.record
        if r.kind == "submitted":
            sub = r.tags.get("submission")
            if isinstance(sub, dict):
                return f"submission {sub.get('name', '?')}: {sub.get('paper', '')}".strip()
        if r.citation:
            return r.citation
        return f"run config {r.config_hash[:12]}" if r.config_hash else ""


@dataclass
class Board:
    """The ranked entries of one suite."""

    suite: str
    reference: str
    shifts: list[str]
    metrics: dict[str, str]           # dataset -> primary metric name shown in the header
    baseline: str                     # baseline used for effective robustness ("" if none)
    entries: list[Entry] = field(default_factory=list)


def _suite_shifts(suite: str, records: Sequence[ResultRecord]) -> list[str]:
    """The registered suite's shifts, else every shift the records name, in order."""
    from robustbench_ft.datasets.registry import get_suite

    try:
        return list(get_suite(suite).shifts)
    except KeyError:
        return list(dict.fromkeys(s for r in records for s in r.shifts))


def suite_baseline(suite: str) -> Baseline | None:
    """The registered suite's baseline fit, or None where the suite is unknown or has none."""
    from robustbench_ft.datasets.registry import get_suite
    from robustbench_ft.robustness.baseline import load_baseline

    try:
        name = get_suite(suite).baseline
    except KeyError:
        return None
    if not name:
        return None
    try:
        return load_baseline(name)
    except (FileNotFoundError, ValueError) as exc:
        warnings.warn(f"suite {suite!r}: baseline {name!r} unavailable ({exc}); showing the effective "
                      f"robustness stored in the records", stacklevel=2)
        return None


def _entry(record: ResultRecord, shifts: list[str], baseline: Baseline | None) -> Entry:
    avg = shift_score(record, SHIFT_AVG, shifts)
    reported = record.summary_score(SHIFT_AVG, shifts) is not None
    if baseline is not None and record.reference in record.metrics:
        er_info = compute_effective_robustness(record, baseline)
    elif baseline is not None:
        er_info = {}
    else:
        er_info = record.effective_robustness or {}
    er = er_info.get(SHIFT_AVG)
    return Entry(record, None, record.reference_score if record.reference in record.metrics else None,
                 {s: record.score(s) if s in record.metrics else None for s in shifts}, avg, reported,
                 float(er) if isinstance(er, (int, float)) else None,
                 str(er_info.get("baseline", "")) if er is not None else "")


def build_leaderboard(
    records: Iterable[ResultRecord],
    *,
    suite: str | None = None,
    model: str | None = None,
    baselines: dict[str, Baseline | None] | None = None,
) -> list[Board]:
    """Boards, one per suite (sorted by name), of the non-baseline records that pass the filters.

    ``baselines`` maps a suite to the fit its effective robustness is measured against; a suite not
    in it uses its registered baseline (``suite_baseline``), and without one the records' stored
    values. Rows are ranked by shift average, then reference accuracy, then name."""
    chosen = [r for r in records if r.kind != "baseline" and (suite is None or r.suite == suite)
              and (model is None or r.model == model)]
    boards = []
    for name in sorted({r.suite for r in chosen}):
        members = [r for r in chosen if r.suite == name]
        refs = sorted({r.reference for r in members})
        if len(refs) > 1:
            raise ValueError(f"suite {name!r}: records use different reference datasets {refs}; "
                             f"fix the records (a suite has one reference)")
        shifts = _suite_shifts(name, members)
        baseline = (baselines or {}).get(name) if name in (baselines or {}) else suite_baseline(name)
        entries = [_entry(r, shifts, baseline) for r in members]
        entries.sort(key=lambda e: (e.score(shifts) is None, -(e.score(shifts) or 0.0), -(e.reference or 0.0),
                                    e.record.candidate, e.record.record_id))
        for i, e in enumerate(x for x in entries if x.score(shifts) is not None):
            e.rank = i + 1
        metrics = {d: next((r.primary_metric[d] for r in members if d in r.primary_metric), "top1")
                   for d in [refs[0], *shifts]}
        used = sorted({e.er_baseline for e in entries if e.er_baseline})
        boards.append(Board(name, refs[0], shifts, metrics, ", ".join(used), entries))
    return boards


# --------------------------------------------------------------------------------------------
# Renderings
# --------------------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _pp(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.1f}"


def _short(text: str, limit: int = MAX_TEXT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _header(board: Board, dataset: str) -> str:
    metric = board.metrics.get(dataset, "top1")
    return dataset if metric == "top1" else f"{dataset} ({metric})"


def _columns(board: Board) -> list[str]:
    return ["rank", "candidate", "kind", "method", "model", f"{_header(board, board.reference)} (ref)",
            *(_header(board, s) for s in board.shifts), "shift avg", "ER (pp)", "source"]


def _numeric_columns(columns: Sequence[str]) -> set[int]:
    """Rank and the score columns (reference … ER): right-aligned, and our own formatting."""
    return {0, *range(5, len(columns) - 1)}


def _row_text(board: Board, e: Entry) -> list[str]:
    r = e.record
    avg = _pct(e.shift_avg) + (" †" if e.shift_avg_reported else "")
    return [str(e.rank) if e.rank else "—", r.candidate, r.kind, r.method,
            f"{r.model} ({r.pretrained})", _pct(e.reference), *(_pct(e.shifts[s]) for s in board.shifts), avg,
            _pp(e.er), e.source]


def _citations(board: Board) -> list[str]:
    """Each published source once, in full (cells show the short form)."""
    return list(dict.fromkeys(f"{e.source_short}: {e.source}" for e in board.entries if e.record.kind == "published"))


def _notes(board: Board) -> list[str]:
    notes = [f"accuracy in %; ranked by shift avg = mean over {', '.join(board.shifts)}" if board.shifts
             else "accuracy in %; ranked by reference accuracy (the suite has no shifts)"]
    if any(e.shift_avg_reported for e in board.entries):
        notes.append("† shift average as the paper reports it (it may give no per-shift numbers, or tune "
                     "each column separately)")
    notes.append(f"ER = effective robustness of the shift average in percentage points, against "
                 f"{board.baseline or 'no baseline'}")
    notes += [f"{_short(e.record.candidate, 60)}: evaluated with unreadable samples left out ({e.record.skipped_note()}); "
              f"its scores are over the samples read" for e in board.entries if e.record.skipped_samples]
    if any(e.rank is None for e in board.entries):
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
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["suite", "rank", "kind", "candidate", "method", "model", "pretrained", "reference",
                     "reference_score", *datasets, "shift_avg", "shift_avg_reported", "effective_robustness",
                     "baseline", "source", "record_id"])

    def num(v: float | None) -> str:
        return "" if v is None or not math.isfinite(v) else repr(round(float(v), 6))

    for b in boards:
        for e in b.entries:
            r = e.record
            writer.writerow([_csv_text(x) for x in (b.suite, str(e.rank or ""), r.kind, r.candidate, r.method,
                                                     r.model, r.pretrained, r.reference)]
                            + [num(e.reference), *(num(e.shifts.get(d)) if d in b.shifts else "" for d in datasets),
                               num(e.shift_avg), "yes" if e.shift_avg_reported else "", num(e.er)]
                            + [_csv_text(x) for x in (e.er_baseline, e.source, r.record_id)])
    return buf.getvalue()


def to_html(boards: Sequence[Board], title: str = "robustbench-ft leaderboard") -> str:
    from robustbench_ft.report.html import Cell, Table, er_cell, template_environment

    views = []
    for b in boards:
        cols = _columns(b)
        numeric = _numeric_columns(cols)
        table = Table([Cell(c, "num wrap" if i in numeric else "") for i, c in enumerate(cols)])
        for e in b.entries:
            text = _row_text(b, e)
            cells = [Cell(t, "num" if i in numeric else "") for i, t in enumerate(text)]
            cells[1] = Cell(e.record.candidate, "name", e.record.record_id)
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
