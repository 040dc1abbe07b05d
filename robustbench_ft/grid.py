"""Model grids, as CLIP_benchmark runs them: one command evaluates every (model, pretrained) pair on a suite.

The pairs are the product of comma-separated ``--model`` and ``--pretrained`` lists, or the lines
``model,pretrained`` of a ``--models-file`` (CLIP_benchmark ``cli.py``: ``product(base.model,
base.pretrained)``, and ``--pretrained_model FILE`` with one ``model,pretrained`` a line; blank lines
and ``#`` comments are skipped here). Every pair is checked before anything runs, then each runs as a
run of its own (its own records folder, the method and options the command gives); a pair whose
records are already written for the same settings and data is reused rather than recomputed, so a
rerun of a grid resumes it. One report shows every pair, with the zero-shot models' own trend beside
the suite's baseline (:mod:`robustbench_ft.report.figures`).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from robustbench_ft.config import RunConfig
from robustbench_ft.results import ResultRecord
from robustbench_ft.util import slugify, stable_hash

MAX_PAIRS = 1000


def parse_pairs(model: str, pretrained: str, models_file: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The (model, pretrained) pairs a command names (see the module docstring); one pair for plain flags."""
    if models_file is not None:
        path = Path(models_file)
        if not path.is_file():
            raise FileNotFoundError(f"--models-file {path} does not exist")
        pairs = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"--models-file {path}, line {number}: expected 'model,pretrained', got {line[:80]!r}")
            pairs.append((parts[0], parts[1]))
        if not pairs:
            raise ValueError(f"--models-file {path} names no 'model,pretrained' pair")
    else:
        models = [m.strip() for m in model.split(",") if m.strip()]
        tags = [p.strip() for p in pretrained.split(",") if p.strip()]
        if not models or not tags:
            raise ValueError("--model and --pretrained need at least one name each")
        pairs = list(itertools.product(models, tags))
    if len(pairs) > MAX_PAIRS:
        raise ValueError(f"the grid has {len(pairs)} (model, pretrained) pairs; at most {MAX_PAIRS}")
    return list(dict.fromkeys(pairs))


def check_pairs(pairs: list[tuple[str, str]]) -> None:
    """Refuse the grid, listing every bad pair, before any pair runs."""
    from robustbench_ft.models.clip import resolve_weights

    problems = []
    for model, pretrained in pairs:
        try:
            resolve_weights(model, pretrained)
        except (KeyError, ValueError, FileNotFoundError) as exc:
            problems.append(f"{model},{pretrained}: {exc.args[0] if isinstance(exc, KeyError) else exc}")
    if problems:
        raise ValueError(f"{len(problems)} of the grid's {len(pairs)} pairs cannot run: " + "; ".join(problems[:5])
                         + ("; ..." if len(problems) > 5 else ""))


@dataclass
class GridOutcome:
    records: list[ResultRecord]
    report: Path | None
    name: str


def grid_name(config: RunConfig, pairs: list[tuple[str, str]]) -> str:
    return config.run_name or slugify(f"grid-{config.suite}-{config.method}-{stable_hash(pairs)[:8]}")


def _pair_run_name(prefix: str, model: str, pretrained: str) -> str:
    """``PREFIX-MODEL-PRETRAINED`` as one folder name, shortened with a hash where it would be too long."""
    from robustbench_ft.config import MAX_RUN_NAME

    name = f"{prefix}-{slugify(model)}-{slugify(pretrained)}"
    return name if len(name) <= MAX_RUN_NAME else f"{name[:MAX_RUN_NAME - 9]}-{stable_hash([model, pretrained])[:8]}"


def run_grid(config: RunConfig, pairs: list[tuple[str, str]], *, progress: bool = True,
             log: Callable[[str], None] = print) -> GridOutcome:
    """Run ``config`` for every pair (see the module docstring); one report of all records at the end."""
    from robustbench_ft.runner import render_grid_report, run

    check_pairs(pairs)
    name = grid_name(config, pairs)
    records: list[ResultRecord] = []
    for i, (model, pretrained) in enumerate(pairs, 1):
        log(f"[grid {i}/{len(pairs)}] {model} ({pretrained})")
        run_name = _pair_run_name(config.run_name, model, pretrained) if config.run_name else None
        outcome = run(replace(config, model=model, pretrained=pretrained, run_name=run_name, report=False),
                      progress=progress, log=log)
        records += outcome.records
    report = render_grid_report(records, config, name) if config.report and records else None
    return GridOutcome(records, report, name)
