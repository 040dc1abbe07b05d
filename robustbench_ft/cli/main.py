"""The ``robustbench-ft`` command line. Thin: each subcommand parses its flags and calls the library.

One module per group of subcommands (``run``, ``data``, ``results``, ``models``), each adding its
parsers with a handler; errors a user can fix end as one line, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from robustbench_ft.cli import data, models, results
from robustbench_ft.cli.run import cmd_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustbench-ft", description="Benchmark robust fine-tuning of CLIP models.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="fine-tune, evaluate, write records and a report (see `run --help`)", add_help=False)
    for group in (data, models, results):
        group.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from robustbench_ft.models.clip import CheckpointError
    from robustbench_ft.results import RecordError
    from robustbench_ft.shards.manifest import ShardError

    try:
        if argv and argv[0] == "run":
            return cmd_run(argv[1:])
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (KeyError, ValueError, OSError, CheckpointError, ShardError, RecordError, FloatingPointError,
            ModuleNotFoundError) as exc:
        print(f"robustbench-ft: error: {_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustbench-ft: interrupted; finished records are kept and the next run resumes", file=sys.stderr)
        return 130


def _message(exc: BaseException) -> str:
    """One line for a refused input: the error's own words, and for a bare OS error (an output path that
    is a directory, a file where a folder is needed) which path and what to do."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}; check the path (a file where a file is written, a folder for a folder)"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
