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

Rows over seeds show their mean (± std); oracle rows (an α of a sweep) are unranked. Renderings:
:mod:`robustbench_ft.board.render`.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from robustbench_ft.perturbations.spec import PAPER_SET
from robustbench_ft.results import ResultRecord
from robustbench_ft.robustness.baseline import SHIFT_AVG, Baseline, shift_score
from robustbench_ft.robustness.effective import compute_effective_robustness

MAX_TEXT = 120


@dataclass
class Entry:
    """One row: a record, or the records of one run at several seeds, and the numbers the board shows.

    Over seeds every number is the mean, and ``spread`` holds the sample standard deviation (ddof 1,
    as FLYP reports its ± over seeds) under "reference", each shift's name, "shift_avg" and "er".
    ``oracle``: the row's α is one of a sweep's (``Placement.choice == "oracle"``): its place would be
    chosen on test data, so it is not ranked unless the board is built with ``include_oracle``.
    """

    records: list[ResultRecord]
    rank: int | None
    reference: float | None
    shifts: dict[str, float | None]
    shift_avg: float | None
    shift_avg_reported: bool          # taken from the paper's reported mean, not from per-shift scores
    er: float | None                  # effective robustness of the shift average (fraction)
    er_baseline: str                  # the baseline ``er`` was measured against ("" if none)
    spread: dict[str, float] = field(default_factory=dict)
    oracle: bool = False

    @property
    def record(self) -> ResultRecord:
        """The row's record (the first seed's, for a row over seeds)."""
        return self.records[0]

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.records if r.seed is not None)

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
        return shorten(text, 60)

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
    # perturbation shifts any of its records scored (robust accuracy columns; never ranked, no ER)
    perturbations: list[str] = field(default_factory=list)


def shorten(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
    """The row of one record."""
    avg = shift_score(record, SHIFT_AVG, shifts)
    reported = record.summary_score(SHIFT_AVG, shifts) is not None
    if baseline is not None and record.reference in record.metrics:
        er_info = compute_effective_robustness(record, baseline)
    elif baseline is not None:
        er_info = {}
    else:
        er_info = record.effective_robustness or {}
    er = er_info.get(SHIFT_AVG)
    return Entry([record], None, record.reference_score if record.reference in record.metrics else None,
                 {s: record.score(s) if s in record.metrics else None for s in shifts}, avg, reported,
                 float(er) if isinstance(er, (int, float)) else None,
                 str(er_info.get("baseline", "")) if er is not None else "",
                 oracle=record.placement.choice == "oracle")


def _over_seeds(rows: list[Entry]) -> Entry:
    """One row for the entries of one run at several seeds: means, and sample standard deviations."""
    if len(rows) == 1:
        return rows[0]

    def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
        if any(v is None for v in values):
            return None, None
        return float(np.mean(values)), float(np.std(values, ddof=1))

    spread: dict[str, float] = {}
    numbers = {"reference": [r.reference for r in rows], "shift_avg": [r.shift_avg for r in rows],
               "er": [r.er for r in rows], **{s: [r.shifts[s] for r in rows] for s in rows[0].shifts}}
    means = {}
    for key, values in numbers.items():
        means[key], std = mean_std(values)
        if std is not None:
            spread[key] = std
    first = rows[0]
    return Entry([r.record for r in sorted(rows, key=lambda r: (r.record.seed or 0))], None, means["reference"],
                 {s: means[s] for s in first.shifts}, means["shift_avg"], first.shift_avg_reported, means["er"],
                 first.er_baseline, spread, first.oracle)


def build_leaderboard(
    records: Iterable[ResultRecord],
    *,
    suite: str | None = None,
    model: str | None = None,
    baselines: dict[str, Baseline | None] | None = None,
    include_oracle: bool = False,
) -> list[Board]:
    """Boards, one per suite (sorted by name), of the non-baseline records that pass the filters.

    ``baselines`` maps a suite to the fit its effective robustness is measured against; a suite not
    in it uses its registered baseline (``suite_baseline``), and without one the records' stored
    values. The records of one run at several seeds are one row (``ResultRecord.seed_group``), its
    numbers the means. Rows are ranked by shift average, then reference accuracy, then name; oracle
    rows (an α of a sweep) are listed unranked unless ``include_oracle``."""
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
        groups: dict[str, list[Entry]] = {}
        for r in members:
            groups.setdefault(r.seed_group, []).append(_entry(r, shifts, baseline))
        entries = [_over_seeds(rows) for rows in groups.values()]
        ranked = lambda e: e.score(shifts) is not None and (include_oracle or not e.oracle)  # noqa: E731
        entries.sort(key=lambda e: (not ranked(e), -(e.score(shifts) or 0.0), -(e.reference or 0.0),
                                    e.record.candidate, e.record.record_id))
        for i, e in enumerate(x for x in entries if ranked(x)):
            e.rank = i + 1
        metrics = {d: next((r.primary_metric[d] for r in members if d in r.primary_metric), "top1")
                   for d in [refs[0], *shifts]}
        used = sorted({e.er_baseline for e in entries if e.er_baseline})
        board = Board(name, refs[0], shifts, metrics, ", ".join(used), entries)
        names = list(dict.fromkeys(p for r in members for p in r.perturbations))
        board.perturbations = sorted(names, key=lambda p: (PAPER_SET.index(p) if p in PAPER_SET else len(PAPER_SET)))
        boards.append(board)
    return boards
