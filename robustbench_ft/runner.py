"""``run(config)``: what ``robustbench-ft run`` does, callable from Python.

config -> model -> method candidates -> one evaluation pass per dataset -> metrics and effective
robustness -> one result record per candidate -> HTML report. Records already written for the same
config are reused, and logits are cached, so an interrupted run resumes where it stopped.

Under ``torchrun`` every process runs this same function (see :mod:`robustbench_ft.distributed`):
they fine-tune together and split evaluation, and only rank 0 logs, writes records and renders.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from robustbench_ft import distributed
from robustbench_ft.config import RunConfig, stable_hash
from robustbench_ft.data.registry import ensure_dataset, get_dataset, get_suite, prepare_suite, silent
from robustbench_ft.data.shards import Manifest
from robustbench_ft.evaluate import LogitsCache, evaluate_cached
from robustbench_ft.methods.base import Candidate, MethodContext
from robustbench_ft.methods.registry import get_method
from robustbench_ft import metrics as metrics_mod
from robustbench_ft.models.clip import load_clip, resolve_device, resolve_weights
from robustbench_ft.results import (
    RecordError, ResultRecord, load_record, now_iso, slugify, software_versions, write_record,
)


@dataclass
class RunOutcome:
    config: RunConfig
    records: list[ResultRecord]
    record_paths: list[Path]
    report: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def run(config: RunConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> RunOutcome:
    """Run a method on a suite and write its records (and report). See the module docstring."""
    with distributed.process_group(config.device) as world:
        if not world.is_main:  # one voice: rank 0 reports for all
            progress, log = False, silent
        return _run(config, progress=progress, log=log)


def _run(config: RunConfig, *, progress: bool, log: Callable[[str], None]) -> RunOutcome:
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    suite = get_suite(config.suite)
    method = get_method(config.method)
    options = method.make_options({**suite.method_defaults.get(config.method, {}), **config.method_options})
    resolve_weights(config.model, config.pretrained)  # reject a bad model or tag before writing anything
    resolve_device(config.device)
    for flag in ("data_root", "cache_dir", "results_dir") + (("reports_dir",) if config.report else ()):
        check_writable(Path(getattr(config, flag)), flag)
    specs = {name: get_dataset(name) for name in suite.eval_datasets}
    root = Path(config.data_root)
    skip = config.on_bad_sample == "skip"
    with distributed.main_first():  # rank 0 builds what is missing, the others then find it
        prepare_suite(suite, root, processes=max(1, config.workers), log=log)
        dirs = {name: ensure_dataset(spec, root, "test", log=log, damaged_ok=skip) for name, spec in specs.items()}
    timings = {"prepare_data": time.perf_counter() - t0}

    t = time.perf_counter()
    clip = load_clip(config.model, config.pretrained, distributed.rank_device(config.device), config.precision,
                     trust_pickle=config.trust_pickle)
    ctx = MethodContext(config, clip, suite, options, progress, log)
    candidates = method.cls().run(ctx)
    if not candidates:
        raise RuntimeError(f"method {config.method!r} produced no candidate")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise RuntimeError(f"method {config.method!r} produced duplicate candidate names: {names}")
    timings["method"] = time.perf_counter() - t

    out_dir = Path(config.results_dir) / config.name
    config_hash = config.hash()
    paths = {c.name: out_dir / f"{slugify(c.name)}.json" for c in candidates}
    records: dict[str, ResultRecord] = {}
    for c in candidates:  # resume: a record of this exact config and candidate is final
        try:
            existing = load_record(paths[c.name]) if paths[c.name].is_file() else None
        except RecordError:
            existing = None
        # one that skipped unreadable samples is final only for a run that skips them too
        if (existing is not None and existing.record_id == _record_id(config_hash, c.name)
                and (skip or not existing.skipped_samples)):
            records[c.name] = existing
    pending = [c for c in candidates if c.name not in records]
    if len(pending) < len(candidates):
        log(f"reusing {len(candidates) - len(pending)} finished record(s) in {out_dir}")

    if pending:
        t = time.perf_counter()
        scores, eval_seconds, skipped = _evaluate_all(pending, specs, dirs, clip.preprocess_eval, config, progress,
                                                      suite.reference, log)
        timings["evaluate"] = time.perf_counter() - t
        baseline = _suite_baseline(suite.baseline)
        for c in pending:
            rec = ResultRecord(
                record_id=_record_id(config_hash, c.name), suite=suite.name, model=config.model,
                pretrained=config.pretrained, method=config.method, candidate=c.name, reference=suite.reference,
                shifts=list(suite.shifts), metrics=scores[c.name],
                primary_metric={n: s.metric for n, s in specs.items()}, tags=_jsonable(c.tags),
                config=config.to_dict(), config_hash=config_hash, versions=software_versions(),
                timings={**{k: round(v, 3) for k, v in timings.items()},
                         **{f"eval_{n}": round(s, 3) for n, s in eval_seconds.items()}},
                created=now_iso(), skipped_samples=skipped,
            )
            if baseline is not None:
                from robustbench_ft.robustness import attach_effective_robustness

                attach_effective_robustness(rec, baseline)
            if distributed.world().is_main:
                write_record(rec, paths[c.name])
            records[c.name] = rec
    ordered = [records[c.name] for c in candidates]
    outcome = RunOutcome(config, ordered, [paths[c.name] for c in candidates], None, timings)
    if config.report and distributed.world().is_main:
        outcome.report = render_run_report(ordered, config, suite.baseline)
    timings["total"] = time.perf_counter() - t0
    return outcome


def check_writable(directory: Path, flag: str) -> None:
    """Fail before any work if an output directory cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"cannot write to {directory} ({exc.strerror or exc}); pass a writable "
                              f"--{flag.replace('_', '-')}") from None


def _record_id(config_hash: str, candidate: str) -> str:
    return stable_hash([config_hash, candidate])[:16]


def _jsonable(tags: dict) -> dict:
    return {k: (float(v) if isinstance(v, float) else v) for k, v in tags.items()}


def _evaluate_all(candidates: list[Candidate], specs, dirs, transform, config: RunConfig, progress: bool,
                  reference: str, log: Callable[[str], None] = print):
    """One pass per dataset over all candidates; metrics per candidate and dataset.

    Classifiers output logits over the reference's classes; each dataset's spec maps them onto its
    own (``DatasetSpec.project_logits``), and the reference's metrics also hold its accuracy on the
    classes of each class-subset shift (``top1@<shift>``), the x value of that shift's effective
    robustness. A shard set built with files skipped says how many (``num_skipped``). With
    ``on_bad_sample="skip"``, samples unreadable now are left out, the metrics are over the samples
    read, and the third return value says per dataset what was skipped (``ResultRecord.skipped_samples``).
    """
    cache = LogitsCache(Path(config.cache_dir) / "logits")
    features = LogitsCache(Path(config.cache_dir) / "features")  # shared with the linear probe's training features
    classifiers = {c.name: c.classifier for c in candidates}
    scores: dict[str, dict[str, dict]] = {c.name: {} for c in candidates}
    seconds: dict[str, float] = {}
    unread: dict[str, dict] = {}
    for name, spec in specs.items():
        preds = evaluate_cached(classifiers, dirs[name], transform, cache, batch_size=config.eval_batch_size,
                                workers=config.workers, device=next(iter(classifiers.values())).head.weight.device,
                                precision=config.precision, progress=progress, desc=f"eval {name}",
                                keep_meta=bool(metrics_mod.NEEDS_META & {spec.metric, *spec.extra_metrics}),
                                num_outputs=len(specs[reference].classnames), on_bad=config.on_bad_sample,
                                features=features, decode=config.decode, draft_factor=config.draft_factor,
                                compile_model=config.compile)
        seconds[name] = preds.seconds
        if preds.skipped:
            unread[name] = preds.skipped
            log(f"warning: {name}: skipped {preds.skipped['count']} unreadable sample(s); its metrics are over the "
                f"{len(preds.labels)} read (listed in the records)")
        skipped = Manifest.load(dirs[name]).metadata.get("num_skipped")
        for cname in classifiers:
            logits = spec.project_logits(preds.logits[cname])
            scores[cname][name] = metrics_mod.compute(spec.metric, logits, preds.labels, preds.metas,
                                                      spec.extra_metrics)
            if skipped is not None:
                scores[cname][name]["num_skipped"] = int(skipped)
            if name == reference:
                scores[cname][name].update(metrics_mod.reference_subset_scores(preds.logits[cname], preds.labels,
                                                                               specs.values()))
    return scores, seconds, unread


def _suite_baseline(name: str | None):
    if name is None:
        return None
    from robustbench_ft.robustness import load_baseline

    return load_baseline(name)


def render_run_report(records: list[ResultRecord], config: RunConfig, baseline_name: str | None) -> Path:
    """The run's HTML report, with the suite's baseline models drawn behind the candidates."""
    from robustbench_ft.report import render_report
    from robustbench_ft.robustness import baseline_records

    shown = records + (baseline_records(baseline_name) if baseline_name else [])
    return render_report(shown, Path(config.reports_dir) / config.name, baseline=_suite_baseline(baseline_name),
                         title=f"{config.method} on {config.suite} ({config.model}, {config.pretrained})")
