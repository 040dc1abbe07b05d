"""``robustbench-ft`` command line. Thin: parses flags, builds a RunConfig, calls the library."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from robustbench_ft.config import RunConfig
from robustbench_ft.typed import field_hints, from_text

RUN_FLAGS = [f for f in dataclasses.fields(RunConfig) if f.name != "method_options"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML run config; flags override its values")
    hints = field_hints(RunConfig)
    for f in RUN_FLAGS:
        if hints[f.name] is bool:
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default: {f.default})")
        else:
            p.add_argument(_flag(f.name), default=None, help=f"(default: {f.default})")


def _add_method_flags(p: argparse.ArgumentParser, method: str, seen: set[str]) -> list[str]:
    """Flags for one method's options; returns the option names added."""
    from robustbench_ft.methods.registry import get_method

    spec = get_method(method)
    group = p.add_argument_group(f"options of method {spec.name!r}")
    added = []
    for f in dataclasses.fields(spec.options):
        if f.name in seen or typing.get_origin(typing.get_type_hints(spec.options)[f.name]) is dict:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        group.add_argument(_flag(f.name), dest=f"opt__{f.name}", default=None, metavar=f.name.upper(),
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
    return RunConfig.from_toml(args.config, **overrides) if args.config else RunConfig(**overrides)


def cmd_run(argv: Sequence[str]) -> int:
    config = run_config_from_argv(argv)
    from robustbench_ft.runner import run

    outcome = run(config)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone prints the summary
        return 0
    print_summary(outcome.records)
    print(f"\nrecords: {Path(config.results_dir) / config.name}/")
    if outcome.report:
        print(f"report:  {outcome.report}")
    return 0


def print_summary(records: list) -> None:
    """A plain-text table: candidate, reference, each shift, shift mean, effective robustness."""
    if not records:
        return
    first = records[0]
    cols = [first.reference, *first.shifts]
    header = ["candidate", *cols, "shift avg", "ER avg (pp)"]
    rows = []
    for r in records:
        er = r.effective_robustness.get("shift-avg") if r.effective_robustness else None
        rows.append([r.candidate, *[f"{100 * r.score(c):.1f}" for c in cols], f"{100 * r.shift_mean:.1f}",
                     "-" if er is None else f"{100 * er:+.1f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print("\n" + line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))))
    print(f"(accuracy in %, {first.primary_metric.get(first.reference, 'top1')} on the reference; "
          "ER = effective robustness against the suite's baseline fit)")


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from robustbench_ft.methods.registry import list_methods

        for m in list_methods():
            print(f"{m.name:12s} {m.summary}")
            if m.paper:
                print(f"{'':12s} paper: {m.paper}")
            for f in dataclasses.fields(m.options):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                print(f"{'':12s}   {_flag(f.name)} (default: {default})")
    elif args.what == "datasets":
        from robustbench_ft.data.registry import list_datasets

        for d in list_datasets():
            built = [s for s in d.splits if (d.path(Path(args.data_root), s) / "manifest.json").is_file()]
            print(f"{d.name:16s} {len(d.classnames):5d} classes  metric={d.metric:6s} splits={','.join(d.splits)}"
                  f"  built={','.join(built) or 'no'}  {d.description}")
    elif args.what == "suites":
        from robustbench_ft.data.registry import list_suites, suite_data_status

        for s in list_suites():
            print(f"{s.name}: reference {s.reference}; shifts {', '.join(s.shifts) or 'none'}; "
                  f"train {'/'.join(s.train)}; baseline {s.baseline or 'none'}")
            if s.description:
                print(f"    {s.description}")
            status = suite_data_status(s, Path(args.data_root))
            print(f"    data under {args.data_root}: " + "; ".join(f"{state}: {', '.join(splits)}"
                                                                   for state, splits in status.items()))
            for m, d in s.method_defaults.items():
                print(f"    defaults for {m}: {d}")
    else:
        from robustbench_ft.models.clip import list_models, pretrained_tags

        for name in list_models():
            tags = pretrained_tags(name)
            print(f"{name:40s} {', '.join(tags) if tags else '(no pretrained tags: random or a local file)'}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    src, out = args.src or args.src_path, args.out or args.out_path
    if args.format == "imagefolder":
        wrong = {"--border-crop": args.border_crop, "--allow-count-mismatch": args.allow_count_mismatch or None}
        where = "dataset conversions (`shard DATASET --src RAW`)"
    else:
        wrong = {"--name": args.name, "--shuffle-seed": args.shuffle_seed}
        where = "`shard imagefolder` (dataset converters shuffle their training splits themselves)"
    misplaced = [flag for flag, value in wrong.items() if value is not None]
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: only for {where}")
    if args.format == "imagefolder":
        from robustbench_ft.data.imagefolder import write_imagefolder_shards

        if src is None or out is None:
            raise ValueError("shard imagefolder needs SRC and OUT: robustbench-ft shard imagefolder SRC OUT")
        manifest = write_imagefolder_shards(src, out, name=args.name, samples_per_shard=args.samples_per_shard,
                                            resize_shorter=args.resize_shorter, image_format=args.image_format or "jpg",
                                            workers=args.workers, on_bad=args.on_bad, shuffle_seed=args.shuffle_seed,
                                            progress=True)
    else:
        from robustbench_ft.data.convert import ConvertOptions, convert_dataset
        from robustbench_ft.data.registry import get_dataset

        spec = get_dataset(args.format)
        if src is None:
            raise ValueError(f"shard {spec.name} needs the official download: --src RAW (see datasets/README.md)")
        out = out or spec.path(Path(args.data_root), args.split)
        options = ConvertOptions(samples_per_shard=args.samples_per_shard, image_format=args.image_format or "keep",
                                 resize_shorter=args.resize_shorter, border_crop=args.border_crop,
                                 workers=args.workers, on_bad=args.on_bad,
                                 allow_count_mismatch=args.allow_count_mismatch)
        manifest = convert_dataset(spec, src, out, args.split, options)
    skipped = manifest.metadata.get("num_skipped", 0)
    print(f"wrote {manifest.num_samples} samples of {len(manifest.classes)} classes in {len(manifest.shards)} "
          f"shard(s) to {out}" + (f"; skipped {skipped} unreadable file(s), listed in its manifest" if skipped else ""))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from robustbench_ft.data.shards import verify_shards

    manifest = verify_shards(args.directory, check_hashes=True)
    print(f"ok: {manifest.num_samples} samples, {len(manifest.classes)} classes, {len(manifest.shards)} shard(s); "
          "sizes and sha256 match the manifest")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    if args.zoo_command == "pretrain-demo":
        from robustbench_ft.zoo.pretrain_demo import PretrainDemoConfig, pretrain_demo

        summary = pretrain_demo(PretrainDemoConfig(), Path(args.out))
        print(json.dumps(summary, indent=2, default=str))
    else:
        from robustbench_ft.zoo.baselines import build_demo_zoo

        paths = build_demo_zoo(out_dir=Path(args.out), data_root=Path(args.data_root), only=args.only or None)
        print(f"{len(paths)} baseline record(s) in {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from robustbench_ft.report import render_report
    from robustbench_ft.results import load_records
    from robustbench_ft.robustness import baseline_records, load_baseline

    records = load_records(args.results)
    if not records:
        raise ValueError(f"no result records found in {', '.join(map(str, args.results))}")
    baseline = load_baseline(args.baseline) if args.baseline else None
    extra = baseline_records(args.baseline) if args.baseline else []
    unique = {r.record_id: r for r in records + extra}  # the baseline's records may be among RESULTS too
    path = render_report(list(unique.values()), args.out, baseline=baseline, title=args.title)
    print(f"report: {path}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from robustbench_ft.testbed import coefficients, fit_testbed_baseline, standard_models

    standard = standard_models(args.standard_models) if args.standard_models else None
    baseline = fit_testbed_baseline(args.testbed, args.transform, standard=standard)
    if args.out:
        baseline.save(args.out)
        print(f"baseline: {args.out}", file=sys.stderr)
    print(json.dumps(coefficients(baseline), indent=2))
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from robustbench_ft.leaderboard import build_leaderboard, format_for, render, write_leaderboard
    from robustbench_ft.results import load_records

    if args.add:
        from robustbench_ft.submissions import add_bundle

        paths = add_bundle(args.add, Path(args.results_dir))
        print(f"accepted: {len(paths)} record(s) in {paths[0].parent}")
        return 0
    records = load_records(args.results or [Path(args.results_dir)])
    baselines = None
    if args.baseline:
        from robustbench_ft.robustness import load_baseline

        fit = load_baseline(args.baseline)
        baselines = {fit.suite: fit}
    boards = build_leaderboard(records, suite=args.suite, model=args.model, baselines=baselines)
    fmt = format_for(args.out, args.format)
    if args.out:
        write_leaderboard(boards, args.out, fmt)
        print(f"leaderboard: {args.out} ({sum(len(b.entries) for b in boards)} entries, {len(boards)} suite(s))")
    else:
        sys.stdout.write(render(boards, fmt))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from robustbench_ft.results import load_records
    from robustbench_ft.submissions import make_bundle, write_bundle

    records = load_records(args.results)
    own = [r for r in records if r.kind == "reproduced"]
    if not own:
        raise ValueError(f"no reproduced records in {', '.join(map(str, args.results))}; submit the records "
                         f"of your runs (published and baseline records are not submissions)")
    bundle = make_bundle(own, name=args.name, paper=args.paper, code=args.code, checkpoint=args.checkpoint)
    write_bundle(bundle, args.out)
    skipped = len(records) - len(own)
    print(f"bundle: {args.out} ({len(own)} record(s){f'; skipped {skipped} not reproduced' if skipped else ''}); "
          f"add it with `robustbench-ft leaderboard --add {args.out}`")
    return 0


def cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from robustbench_ft.data.registry import get_dataset, get_suite
    from robustbench_ft.models.checkpoints import import_checkpoint

    reference = get_dataset(get_suite(args.suite).reference)
    classifier = import_checkpoint(args.checkpoint, args.model, reference.classnames, reference.templates,
                                   trust_pickle=args.trust_pickle)
    weights = classifier.save(args.out)
    layout = classifier.info.provenance["layout"]
    print(f"imported {args.checkpoint} (image encoder under {layout['encoder']!r}, head: {layout['head']}) as a "
          f"{args.model} classifier of {classifier.num_classes} {reference.name} classes: {weights} (+ .json); "
          f"use it with `robustbench-ft run --method wise-ft --model {args.model} --suite {args.suite} "
          f"--finetuned {weights}`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustbench-ft", description="Benchmark robust fine-tuning of CLIP models.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="fine-tune, evaluate, write records and a report (see `run --help`)", add_help=False)
    lp = sub.add_parser("list", help="list methods, datasets, suites or models")
    lp.add_argument("what", choices=["methods", "datasets", "suites", "models"])
    lp.add_argument("--data-root", default=RunConfig.data_root)
    sp = sub.add_parser("shard", help="convert a dataset to verified WebDataset shards",
                        description="`shard imagefolder SRC OUT` converts any SRC/<class>/<image> tree; `shard DATASET "
                                    "--src RAW [--split S] [--out DIR]` converts a registered dataset's official "
                                    "download (layouts: datasets/README.md). Rerunning a killed conversion resumes it.")
    sp.add_argument("format", help="imagefolder, or a dataset name (robustbench-ft list datasets)")
    sp.add_argument("src_path", nargs="?", type=Path, metavar="SRC", help="source folder (or --src)")
    sp.add_argument("out_path", nargs="?", type=Path, metavar="OUT", help="output folder (or --out)")
    sp.add_argument("--src", type=Path, default=None, help="the official download (or ImageFolder tree)")
    sp.add_argument("--out", type=Path, default=None, help="default for a dataset: DATA_ROOT/<dataset>/<split>")
    sp.add_argument("--split", default="test", help="dataset split to convert (default: test)")
    sp.add_argument("--data-root", default=RunConfig.data_root)
    sp.add_argument("--name", default=None, help="shard name prefix (imagefolder)")
    sp.add_argument("--samples-per-shard", type=int, default=1000)
    sp.add_argument("--resize-shorter", type=int, default=None, help="resize so the shorter side is N px")
    sp.add_argument("--image-format", choices=["jpg", "png", "webp", "keep"], default=None,
                    help="default: jpg for imagefolder; keep (the source bytes) for datasets")
    sp.add_argument("--border-crop", type=int, default=None,
                    help="pixels to cut from every image edge before resizing "
                         "(default: the dataset's, ObjectNet 2; 0 = off)")
    sp.add_argument("--allow-count-mismatch", action="store_true",
                    help="convert a download whose image count (or class folders) differs from the official release")
    sp.add_argument("--workers", type=int, default=2)
    sp.add_argument("--on-bad", choices=["error", "skip"], default="error",
                    help="unreadable images: stop with an error naming the file, or skip and count them")
    sp.add_argument("--shuffle-seed", type=int, default=None,
                    help="shuffle files before sharding (for training splits, so streaming readers such as webdataset see "
                         "mixed classes; the harness itself trains in a random order either way)")
    vp = sub.add_parser("verify", help="re-check a shard set against its manifest (counts, classes, sha256)")
    vp.add_argument("directory", type=Path)
    zp = sub.add_parser("zoo", help="rebuild the embedded demo model or the demo baseline zoo")
    zsub = zp.add_subparsers(dest="zoo_command", required=True)
    zpre = zsub.add_parser("pretrain-demo", help="pretrain the demo CLIP from its recipe (CPU, tens of minutes)")
    zpre.add_argument("--out", default="rbft-demo-vit", help="output path stem (.safetensors and .json are written)")
    zbase = zsub.add_parser("baselines", help="train and evaluate the demo suite's baseline zoo (reference data only)")
    zbase.add_argument("--out", default="demo-zoo", help="directory for the baseline records")
    zbase.add_argument("--data-root", default=RunConfig.data_root)
    zbase.add_argument("--only", nargs="*", help="rebuild only these zoo models")
    rp = sub.add_parser("report", help="render an HTML report from result records")
    rp.add_argument("results", nargs="+", type=Path, help="record files or directories")
    rp.add_argument("--out", type=Path, required=True)
    rp.add_argument("--baseline", default=None, help="baseline fit to draw (e.g. demo-zoo)")
    rp.add_argument("--title", default="robustbench-ft report")
    bp = sub.add_parser("baseline", help="fit a suite's baseline trend")
    bsub = bp.add_subparsers(dest="baseline_command", required=True)
    bfit = bsub.add_parser("fit", help="fit the ImageNet baseline to the imagenet-testbed's robustness_top1s.csv")
    bfit.add_argument("--testbed", type=Path, required=True, help="path to robustness_top1s.csv")
    bfit.add_argument("--out", type=Path, default=None, help="store the baseline (coefficients and points) here")
    bfit.add_argument("--transform", choices=["logit", "probit", "linear"], default="logit")
    bfit.add_argument("--standard-models", type=Path, default=None,
                      help="file naming the standard-training models, one per line (default: the shipped list)")
    lb = sub.add_parser("leaderboard", help="rank all records by shift-average accuracy, or add a submission")
    lb.add_argument("results", nargs="*", type=Path, help="record files or directories (default: --results-dir)")
    lb.add_argument("--results-dir", default=RunConfig.results_dir)
    lb.add_argument("--suite", default=None, help="only this suite")
    lb.add_argument("--model", default=None, help="only this open_clip model name")
    lb.add_argument("--baseline", default=None, help="baseline for effective robustness (default: the suite's)")
    lb.add_argument("--format", choices=["html", "md", "csv"], default=None, help="default: from --out, else md")
    lb.add_argument("--out", type=Path, default=None, help="write here instead of printing")
    lb.add_argument("--add", type=Path, default=None, metavar="BUNDLE",
                    help="validate a submission bundle and store its records under RESULTS_DIR/submissions/")
    ip = sub.add_parser("import-checkpoint", help="convert a fine-tuned CLIP checkpoint from another codebase",
                        description="Read an open_clip state dict, a model-soups or WiSE-FT checkpoint (or a full "
                                    "CLIP state dict, whose own text tower then gives the zero-shot head) and save "
                                    "it as a classifier (.safetensors + .json) for `run --finetuned`. Pickles that "
                                    "are not plain tensors are refused unless --trust-pickle.")
    ip.add_argument("checkpoint", type=Path, help="checkpoint file (.safetensors, .pt, .pth, .bin, .ckpt)")
    ip.add_argument("out", type=Path, help="output path stem: OUT.safetensors and OUT.json are written")
    ip.add_argument("--model", required=True, help="open_clip architecture of the checkpoint (e.g. ViT-B-32)")
    ip.add_argument("--suite", default=RunConfig.suite, help="suite whose reference classes the head predicts")
    ip.add_argument("--trust-pickle", action="store_true",
                    help="allow a full unpickle (can run code: only for files from authors you trust)")
    sb = sub.add_parser("submit", help="bundle your records with method metadata for the leaderboard")
    sb.add_argument("results", nargs="+", type=Path, help="record files or directories of your runs")
    sb.add_argument("--name", required=True, help="method name (letters, digits, spaces, . _ + ( ) -)")
    sb.add_argument("--paper", required=True, help="URL of the paper")
    sb.add_argument("--code", required=True, help="URL of the code")
    sb.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file; its sha256 goes in the bundle")
    sb.add_argument("--out", type=Path, required=True, help="bundle file to write")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from robustbench_ft.data.shards import ShardError
    from robustbench_ft.models.clip import CheckpointError
    from robustbench_ft.results import RecordError

    try:
        if argv and argv[0] == "run":
            return cmd_run(argv[1:])
        args = build_parser().parse_args(argv)
        handler = {"list": cmd_list, "shard": cmd_shard, "verify": cmd_verify, "zoo": cmd_zoo,
                   "report": cmd_report, "baseline": cmd_baseline, "leaderboard": cmd_leaderboard,
                   "submit": cmd_submit, "import-checkpoint": cmd_import_checkpoint}[args.command]
        return handler(args)
    except (KeyError, ValueError, FileNotFoundError, PermissionError, CheckpointError, ShardError, RecordError,
            FloatingPointError, ModuleNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"robustbench-ft: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("robustbench-ft: interrupted; finished records are kept and the next run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
