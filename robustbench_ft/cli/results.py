"""`robustbench-ft report | baseline | leaderboard | submit`: records rendered, ranked, bundled; baselines fitted."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from robustbench_ft.config import RunConfig


def cmd_report(args: argparse.Namespace) -> int:
    from robustbench_ft.report import render_report
    from robustbench_ft.results import load_records
    from robustbench_ft.robustness.baseline import baseline_records, load_baseline

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
    from robustbench_ft.robustness.testbed import coefficients, fit_testbed_baseline, standard_models

    standard = standard_models(args.standard_models) if args.standard_models else None
    baseline = fit_testbed_baseline(args.testbed, args.transform, standard=standard)
    if args.out:
        baseline.save(args.out)
        print(f"baseline: {args.out}", file=sys.stderr)
    print(json.dumps(coefficients(baseline), indent=2))
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from robustbench_ft.board.leaderboard import build_leaderboard
    from robustbench_ft.board.render import format_for, render, write_leaderboard
    from robustbench_ft.results import load_records

    if args.add:
        from robustbench_ft.board.submissions import add_bundle

        paths = add_bundle(args.add, Path(args.results_dir))
        print(f"accepted: {len(paths)} record(s) in {paths[0].parent}")
        return 0
    records = load_records(args.results or [Path(args.results_dir)])
    baselines = None
    if args.baseline:
        from robustbench_ft.robustness.baseline import load_baseline

        fit = load_baseline(args.baseline)
        baselines = {fit.suite: fit}
    boards = build_leaderboard(records, suite=args.suite, model=args.model, baselines=baselines,
                               include_oracle=args.include_oracle)
    fmt = format_for(args.out, args.format)
    if args.out:
        write_leaderboard(boards, args.out, fmt)
        print(f"leaderboard: {args.out} ({sum(len(b.entries) for b in boards)} entries, {len(boards)} suite(s))")
    else:
        sys.stdout.write(render(boards, fmt))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from robustbench_ft.board.submissions import make_bundle, write_bundle
    from robustbench_ft.results import load_records

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


def cmd_analyze(args: argparse.Namespace) -> int:
    from robustbench_ft.analyze import analyze, write_analysis

    result = analyze(args.run, progress=True)
    for curve, parts in result["curves"].items():
        print(f"\n{curve}: zero-shot vs fine-tuned")
        print(f"  {'dataset':28s} {'PD':>6s} {'CKAC':>6s} {'overrides':>9s} {'overridden':>10s} {'δ_zs−δ_ft':>9s}")
        for name, d in parts["datasets"].items():
            print(f"  {name:28s} {100 * d['prediction_diversity']:6.1f} {d['cka_complement_logits']:6.3f} "
                  f"{100 * d['zeroshot_overrides']:9.1f} {100 * d['zeroshot_overridden']:10.1f} "
                  f"{d['margin_difference']:9.3f}")
        for name, c in parts["chord"].items():
            print(f"  {name:28s} above the chord at every α: {c['all_above_chord']}; best α {c['best_alpha']:g} "
                  f"{100 * c['best_gain_over_endpoints']:+.1f} pp over the better endpoint")
    path, page = write_analysis(args.run, result, args.out)
    print(f"\n(PD and overrides in % of samples; CKAC on logits; margins in logit units)\nanalysis: {path}\n"
          f"report:   {page}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from robustbench_ft.board.export import records_to_table
    from robustbench_ft.results import load_records

    paths = args.results or [Path(args.results_dir)]
    records = load_records(paths)
    if not records:
        raise ValueError(f"no result records found in {', '.join(map(str, paths))}")
    text = records_to_table(records).to_csv(index=False, lineterminator="\n")
    if args.out is None:
        sys.stdout.write(text)
        return 0
    from robustbench_ft.util import atomic_write_text

    atomic_write_text(args.out, text)
    print(f"export: {args.out} ({len(records)} record(s), {text.count(chr(10)) - 1} rows)", file=sys.stderr)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser("analyze", help="the WiSE-FT paper's analyses of a finished α-curve run (cached models)",
                        description="Prediction diversity, CKA complement, zero-shot overrides with confidence margins "
                                    "and the α curve against its chord, for every α curve of the run in RUN.")
    ap.add_argument("run", type=Path, help="the run's records folder (results/<run>/)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to write analysis.json (default: the run's report folder, beside its re-rendered report)")
    ap.set_defaults(handler=cmd_analyze)
    rp = sub.add_parser("report", help="render an HTML report from result records")
    rp.add_argument("results", nargs="+", type=Path, help="record files or directories")
    rp.add_argument("--out", type=Path, required=True)
    rp.add_argument("--baseline", default=None, help="baseline fit to draw (e.g. demo-zoo)")
    rp.add_argument("--title", default="robustbench-ft report")
    rp.set_defaults(handler=cmd_report)
    bp = sub.add_parser("baseline", help="fit a suite's baseline trend")
    bsub = bp.add_subparsers(dest="baseline_command", required=True)
    bfit = bsub.add_parser("fit", help="fit the ImageNet baseline to the imagenet-testbed's robustness_top1s.csv")
    bfit.add_argument("--testbed", type=Path, required=True, help="path to robustness_top1s.csv")
    bfit.add_argument("--out", type=Path, default=None, help="store the baseline (coefficients and points) here")
    bfit.add_argument("--transform", choices=["logit", "probit", "linear"], default="logit")
    bfit.add_argument("--standard-models", type=Path, default=None,
                      help="file naming the standard-training models, one per line (default: the shipped list)")
    bfit.set_defaults(handler=cmd_baseline)
    lb = sub.add_parser("leaderboard", help="rank all records by shift-average accuracy, or add a submission")
    lb.add_argument("results", nargs="*", type=Path, help="record files or directories (default: --results-dir)")
    lb.add_argument("--results-dir", default=RunConfig.results_dir)
    lb.add_argument("--suite", default=None, help="only this suite")
    lb.add_argument("--model", default=None, help="only this open_clip model name")
    lb.add_argument("--baseline", default=None, help="baseline for effective robustness (default: the suite's)")
    lb.add_argument("--format", choices=["html", "md", "csv"], default=None, help="default: from --out, else md")
    lb.add_argument("--out", type=Path, default=None, help="write here instead of printing")
    lb.add_argument("--include-oracle", action="store_true",
                    help="also rank the α values of sweeps (their best is a choice made on test data)")
    lb.add_argument("--add", type=Path, default=None, metavar="BUNDLE",
                    help="validate a submission bundle and store its records under RESULTS_DIR/submissions/")
    lb.set_defaults(handler=cmd_leaderboard)
    ep = sub.add_parser("export", help="every record as one flat table (CSV), for pandas, R or a spreadsheet",
                        description="One row per number: model, pretrained, method, candidate, dataset, metric, "
                                    "value, suite, seed, record_id, kind (metrics, reported aggregates, effective "
                                    "robustness). Scores are fractions (0.873 = 87.3 %).")
    ep.add_argument("results", nargs="*", type=Path, help="record files or directories (default: --results-dir)")
    ep.add_argument("--results-dir", default=RunConfig.results_dir)
    ep.add_argument("--format", choices=["csv"], default="csv")
    ep.add_argument("--out", type=Path, default=None, help="write here instead of printing")
    ep.set_defaults(handler=cmd_export)
    sb = sub.add_parser("submit", help="bundle your records with method metadata for the leaderboard")
    sb.add_argument("results", nargs="+", type=Path, help="record files or directories of your runs")
    sb.add_argument("--name", required=True, help="method name (letters, digits, spaces, . _ + ( ) -)")
    sb.add_argument("--paper", required=True, help="URL of the paper")
    sb.add_argument("--code", required=True, help="URL of the code")
    sb.add_argument("--checkpoint", default=None,
                    help="checkpoint file or hf-hub:ORG/REPO[@REVISION][/FILE]; its sha256 goes in the bundle")
    sb.add_argument("--out", type=Path, required=True, help="bundle file to write")
    sb.set_defaults(handler=cmd_submit)
