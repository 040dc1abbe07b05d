"""`robustbench-ft run`: flags from RunConfig and the chosen method's options, parsed as the fields declare."""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Sequence

from robustbench_ft.config import RunConfig
from robustbench_ft.typed import field_hints, from_text

RUN_FLAGS = [f for f in dataclasses.fields(RunConfig) if f.name != "method_options"]


def flag(name: str) -> str:
    """The command-line flag of a field: ``eval_batch_size`` -> ``--eval-batch-size``."""
    return "--" + name.replace("_", "-")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML run config; flags override its values")
    p.add_argument("--models-file", type=Path, default=None,
                   help="a grid: one 'model,pretrained' pair a line, each evaluated on the suite (instead of "
                        "--model/--pretrained; comma lists there give their product)")
    hints = field_hints(RunConfig)
    for f in RUN_FLAGS:
        if hints[f.name] is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default: {f.default})")
        else:
            p.add_argument(flag(f.name), default=None, help=f"(default: {f.default})")


def _add_method_flags(p: argparse.ArgumentParser, method: str, seen: set[str]) -> list[str]:
    """Flags for one method's options; returns the option names added."""
    from robustbench_ft.methods.registry import get_method

    spec = get_method(method)
    group = p.add_argument_group(f"options of method {spec.name!r}")
    added = []
    hints = typing.get_type_hints(spec.options)
    for f in dataclasses.fields(spec.options):
        if f.name in seen or typing.get_origin(hints[f.name]) is dict:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if hints[f.name] is bool:
            group.add_argument(flag(f.name), dest=f"opt__{f.name}", default=None,
                               action=argparse.BooleanOptionalAction, help=f"(default: {default})")
        else:
            group.add_argument(flag(f.name), dest=f"opt__{f.name}", default=None, metavar=f.name.upper(),
                               help=f"(default: {default})")
        seen.add(f.name)
        added.append(f.name)
    return added


@dataclasses.dataclass
class _RunFlags:
    """The run parser and which method (and base method) each option flag belongs to."""

    parser: argparse.ArgumentParser
    method: str
    own: list[str]
    base: str | None = None
    base_own: list[str] = dataclasses.field(default_factory=list)


def _run_parser(argv: Sequence[str]) -> _RunFlags:
    """Two-phase parse: the chosen method (and WiSE-FT's base) decide which option flags exist."""
    from robustbench_ft.methods.registry import get_method

    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--method")
    peek.add_argument("--base")
    peek.add_argument("--config", type=Path)
    known, _ = peek.parse_known_args(argv)
    method = known.method
    if method is None and known.config is not None and known.config.is_file():
        method = RunConfig.from_toml(known.config).method
    method = get_method(method or RunConfig.method).name
    p = argparse.ArgumentParser(prog="robustbench-ft run", description="Fine-tune (where the method needs it), "
                                "evaluate every candidate on every dataset of the suite, write records and a report.")
    _add_run_flags(p)
    seen: set[str] = set()
    flags = _RunFlags(p, method, _add_method_flags(p, method, seen))
    fields = {f.name: f for f in dataclasses.fields(get_method(method).options)}
    if "base_options" in fields:
        flags.base = get_method(known.base or fields["base"].default).name
        flags.base_own = _add_method_flags(p, flags.base, seen)
    return flags


def _method_flags(args: argparse.Namespace, names: list[str], method: str | None) -> dict[str, Any]:
    """The option flags given for ``method``, parsed from text as its options dataclass declares them."""
    from robustbench_ft.methods.registry import get_method
    from robustbench_ft.typed import field_hints, from_text

    if method is None:
        return {}
    hints = field_hints(get_method(method).options)
    given = {k: getattr(args, f"opt__{k}") for k in names if getattr(args, f"opt__{k}") is not None}
    return {k: from_text(v, hints[k], k) for k, v in given.items()}


def run_config_from_argv(argv: Sequence[str]) -> RunConfig:
    """The RunConfig that ``robustbench-ft run ARGV`` runs: flags parsed as their fields declare, over
    the ``--config`` file if one is given."""
    return _parse_run(argv)[0]


def grid_from_argv(argv: Sequence[str]) -> tuple[RunConfig, list[tuple[str, str]]]:
    """The RunConfig and the (model, pretrained) pairs of ``robustbench-ft run ARGV`` (one pair unless
    ``--model``/``--pretrained`` are comma lists or ``--models-file`` is given; see :mod:`robustbench_ft.grid`)."""
    from robustbench_ft.grid import parse_pairs

    config, args = _parse_run(argv)
    if args.models_file is not None and (args.model is not None or args.pretrained is not None):
        raise ValueError("--models-file names the (model, pretrained) pairs itself; drop --model and --pretrained")
    return config, parse_pairs(config.model, config.pretrained, args.models_file)


def _parse_run(argv: Sequence[str]) -> tuple[RunConfig, argparse.Namespace]:
    flags = _run_parser(argv)
    args = flags.parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    hints = field_hints(RunConfig)
    for f in RUN_FLAGS:
        value = getattr(args, f.name)
        if value is not None:
            overrides[f.name] = from_text(value, hints[f.name], f.name)
    options = _method_flags(args, flags.own, flags.method)
    base = _method_flags(args, flags.base_own, flags.base)
    if base:
        options["base_options"] = base
    overrides["method_options"] = options
    return (RunConfig.from_toml(args.config, **overrides) if args.config else RunConfig(**overrides)), args


def cmd_run(argv: Sequence[str]) -> int:
    config, pairs = grid_from_argv(argv)
    from robustbench_ft.datasets.robust_transfer import COLLECTIONS

    if config.suite in COLLECTIONS:
        return _cmd_collection(argv, config)
    if len(pairs) > 1:
        return _cmd_grid(config, pairs)
    from dataclasses import replace

    from robustbench_ft.runner import run

    outcome = run(replace(config, model=pairs[0][0], pretrained=pairs[0][1]))
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone prints the summary
        return 0
    print_summary(outcome.records)
    print(f"\nrecords: {outcome.records_dir}/")
    if outcome.report:
        print(f"report:  {outcome.report}")
    return 0


def _cmd_collection(argv: Sequence[str], config: RunConfig) -> int:
    """``--suite <collection>``: the same command once per suite of the collection, each its own run (with
    ``--run-name N``, named ``N-<suite>``)."""
    from robustbench_ft.datasets.robust_transfer import COLLECTIONS

    suites = COLLECTIONS[config.suite]
    for number, suite in enumerate(suites, 1):
        print(f"suite {suite} ({number} of {len(suites)} in {config.suite})")
        named = ["--run-name", f"{config.run_name}-{suite}"] if config.run_name else []
        code = cmd_run([*argv, "--suite", suite, *named])
        if code:
            return code
    return 0


def _cmd_grid(config: RunConfig, pairs: list[tuple[str, str]]) -> int:
    from robustbench_ft.grid import run_grid

    outcome = run_grid(config, pairs)
    if os.environ.get("RANK", "0") != "0":
        return 0
    print_summary(outcome.records, with_model=True)
    print(f"\nrecords: {config.results_dir}/ ({len(pairs)} runs)")
    if outcome.report:
        print(f"report:  {outcome.report}")
    return 0


def print_summary(records: list, *, with_model: bool = False) -> None:
    """A plain-text table: candidate, reference, each shift, shift mean, effective robustness; for a run over
    several seeds, one row per candidate with mean ± std over the seeds instead of one table per seed."""
    if not records:
        return
    first = records[0]
    cols = [first.reference, *first.shifts]
    if len({r.seed for r in records}) > 1 and not with_model:
        from robustbench_ft.report.tables import seeds_table

        table = seeds_table(records, first.reference, list(first.shifts), list(first.shifts))
        header = [c.text for c in table.columns]
        rows = [[c.text for c in row] for row in table.rows]
        note = "mean ± sample std over the seeds"
    else:
        header = ["candidate", *(["model"] if with_model else []), *cols, "shift avg", "ER avg (pp)"]
        rows = []
        for r in records:
            er = r.effective_robustness.get("shift-avg") if r.effective_robustness else None
            rows.append([r.label, *([f"{r.model} ({r.pretrained})"] if with_model else []),
                         *[f"{100 * r.score(c):.1f}" for c in cols], f"{100 * r.shift_mean:.1f}",
                         "-" if er is None else f"{100 * er:+.1f}"])
        note = "ER = effective robustness against the suite's baseline fit"
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print("\n" + line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))))
    print(f"(accuracy in %, {first.primary_metric.get(first.reference, 'top1')} on the reference; {note})")
