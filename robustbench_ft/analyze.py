"""``analyze(run_dir)``: the WiSE-FT paper's analyses of a finished run, from its cached models, logits and
features (``robustbench-ft analyze RUN``; the functions are :mod:`robustbench_ft.board.analyses`).

The run is rebuilt from its records' config: its checkpoints come from the cache (nothing is trained;
a missing checkpoint is an error that says to rerun ``run``), its logits and image features too where
cached (else they are computed and cached). For every α curve of the run, on every dataset of the suite:
prediction diversity and CKA complement of the zero-shot and fine-tuned models, how often the
zero-shot model overrides or is overridden in the α = 0.5 ensemble with the confidence margins, and
the curve against the chord between its endpoints.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from robustbench_ft.board import analyses
from robustbench_ft.config import RunConfig
from robustbench_ft.datasets.build import data_identity, ensure_dataset
from robustbench_ft.datasets.fewshot import shot_data
from robustbench_ft.datasets.registry import get_dataset
from robustbench_ft.evaluation.cache import ArrayCache
from robustbench_ft.evaluation.dataset_pass import evaluate_cached
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.evaluation.scoring import logits_for
from robustbench_ft.loading.eval_decode import transform_id
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.resolve import resolve
from robustbench_ft.models.classifier import Classifier, state_hash
from robustbench_ft.models.clip import load_clip
from robustbench_ft.results import ResultRecord, load_records
from robustbench_ft.robustness.baseline import SHIFT_AVG, shift_score
from robustbench_ft.shards.manifest import Manifest


def run_config_of(record: ResultRecord) -> RunConfig:
    """The RunConfig a reproduced record was made with (its stored config, type-checked again)."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    if not record.config or "method" not in record.config:
        raise ValueError(f"record {record.record_id} holds no run config: only reproduced records can be analysed")
    return RunConfig(**{k: v for k, v in record.config.items() if k in known})


def curve_points(records: list[ResultRecord]) -> dict[str, dict[float, ResultRecord]]:
    """α -> record of every curve in ``records`` (the val-chosen row is a copy of one α and is left out)."""
    curves: dict[str, dict[float, ResultRecord]] = {}
    for r in records:
        place = r.placement
        if place.curve is not None and place.alpha is not None and place.choice != "val":
            curves.setdefault(place.curve, {})[place.alpha] = r
    return curves


def analyze(run_dir: Path, *, progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The analyses of the run whose records are in ``run_dir`` (see the module docstring)."""
    records = [r for r in load_records([run_dir]) if r.kind == "reproduced"]
    if not records:
        raise FileNotFoundError(f"no reproduced records in {run_dir}; point at a folder written by `robustbench-ft run`")
    if len({r.config_hash for r in records}) > 1:
        raise ValueError(f"{run_dir} holds records of several runs (a --seeds run?); analyse one seed's folder")
    resolved = resolve(run_config_of(records[0]))
    config, suite = resolved.config, resolved.suite
    curves = {c: pts for c, pts in curve_points(records).items() if 0.0 in pts and 1.0 in pts}
    if not curves:
        raise ValueError(f"the run in {run_dir} has no α curve with both endpoints (wise-ft or ensemble runs do)")
    root = Path(config.data_root)
    dirs = {name: ensure_dataset(get_dataset(name), root, "test", log=log) for name in suite.eval_datasets}
    torch.manual_seed(config.seed)  # as the runner does: "random" weights are drawn from the run's seed
    clip = load_clip(config.model, config.pretrained, config.device, config.precision, trust_pickle=config.trust_pickle)
    data = data_identity(suite, root)
    ctx = MethodContext(resolved, clip, data, progress, log, train_missing=False)
    data.update(shot_data(ctx.shot_subsets()))  # a --shots run's checkpoints are keyed by its shots too
    candidates = resolved.method.cls().run(ctx)
    out: dict[str, Any] = {"run": str(run_dir), "suite": suite.name, "curves": {},
                           "report_dir": str(Path(config.reports_dir) / Path(run_dir).name)}
    for curve, points in curves.items():
        on_curve = {c.alpha: c for c in candidates if c.curve == curve and c.choice != "val"}
        zs, ft, mid = on_curve.get(0.0), on_curve.get(1.0), on_curve.get(0.5)
        if zs is None or ft is None:
            continue
        datasets = {name: _dataset_analysis(ctx, name, dirs[name], zs, ft, mid) for name in suite.eval_datasets}
        out["curves"][curve] = {"datasets": datasets, "chord": _chords(points, suite.reference, list(suite.shifts))}
    return out


def _dataset_analysis(ctx: MethodContext, name: str, directory: Path, zs: Candidate, ft: Candidate,
                      mid: Candidate | None) -> dict[str, Any]:
    spec = get_dataset(name)
    config = ctx.config
    models = {"zeroshot": zs.classifier, "finetuned": ft.classifier, **({"ensemble": mid.classifier} if mid else {})}
    preds = evaluate_cached(models, directory, ctx.clip.preprocess_eval,
                            ArrayCache(Path(config.cache_dir) / "logits", ctx.log),
                            EvalOptions.from_config(config, ctx.clip.device, progress=ctx.progress),
                            desc=f"analyse {name}", num_outputs=len(get_dataset(ctx.suite.reference).classnames))
    logits = {k: logits_for(models[k], preds.logits[k], spec.project_logits) for k in models}
    if "ensemble" not in logits:  # no α = 0.5 candidate: the output-space ensemble of the endpoints
        logits["ensemble"] = 0.5 * (logits["zeroshot"] + logits["finetuned"])
    result: dict[str, Any] = {
        "n": int(len(preds.labels)),
        "prediction_diversity": analyses.prediction_diversity(logits["zeroshot"], logits["finetuned"], preds.labels),
        "cka_complement_logits": analyses.cka_complement(logits["zeroshot"], logits["finetuned"]),
        **analyses.overrides(logits["zeroshot"], logits["finetuned"], logits["ensemble"]),
    }
    features = [_cached_features(ctx, m, directory) for m in (zs.classifier, ft.classifier)]
    if all(f is not None for f in features) and len(features[0]) == len(features[1]):
        result["cka_complement_features"] = analyses.cka_complement(features[0], features[1])
    return result


def _cached_features(ctx: MethodContext, model: Any, directory: Path) -> np.ndarray | None:
    """The model's image features on the dataset from the feature cache, if they are there."""
    if not isinstance(model, Classifier):
        return None
    manifest = Manifest.load(directory)
    cache = ArrayCache(Path(ctx.config.cache_dir) / "features", ctx.log)
    hit = cache.get(cache.path(state_hash(model.visual), manifest.content_hash(),
                               _feature_transform_id(ctx, manifest)), rows=manifest.num_samples)
    return None if hit is None else np.asarray(hit[0])


def _feature_transform_id(ctx: MethodContext, manifest: Manifest) -> str:
    from robustbench_ft.evaluation.pipeline import eval_pipeline

    options = EvalOptions.from_config(ctx.config, ctx.clip.device)
    try:
        return eval_pipeline(ctx.clip.preprocess_eval, options.torch_device, manifest.image_format, options.decode,
                             draft_factor=options.draft_factor, on_bad=options.on_bad).transform_id
    except ValueError:
        return transform_id(ctx.clip.preprocess_eval)


def _chords(points: dict[float, ResultRecord], reference: str, shifts: list[str]) -> dict[str, Any]:
    out = {}
    for column in [reference, *shifts, SHIFT_AVG]:
        accuracy = {a: (shift_score(r, SHIFT_AVG, shifts) if column == SHIFT_AVG
                        else r.score(column) if column in r.metrics else None) for a, r in points.items()}
        accuracy = {a: v for a, v in accuracy.items() if v is not None}
        if 0.0 in accuracy and 1.0 in accuracy:
            out[column] = analyses.curve_against_chord(accuracy)
    return out


def write_analysis(run_dir: Path, result: dict[str, Any], out: Path | None = None) -> tuple[Path, Path]:
    """``analysis.json`` and the run's report with an analysis section, in the run's report folder
    (``out`` for the JSON, if given). Returns (JSON path, report page)."""
    import json

    from robustbench_ft.report import render_report
    from robustbench_ft.robustness.baseline import baseline_records, load_baseline
    from robustbench_ft.util import atomic_write_text

    report_dir = Path(result["report_dir"])
    path = Path(out) if out else report_dir / "analysis.json"
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    records = load_records([run_dir])
    name = resolve(run_config_of(records[0])).suite.baseline
    page = render_report(records + (baseline_records(name) if name else []), report_dir,
                         baseline=load_baseline(name) if name else None, analysis=result,
                         title=f"{records[0].method} on {records[0].suite} ({records[0].model}, {records[0].pretrained})")
    return path, page
