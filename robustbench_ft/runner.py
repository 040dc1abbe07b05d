"""``run(config)``: what ``robustbench-ft run`` does, callable from Python.

config -> resolved run (suite defaults applied, identity hashed) -> data prepared and identified ->
model -> method candidates -> one evaluation pass per dataset -> metrics and effective robustness ->
one result record per candidate -> HTML report. Records already written for the same run and data
are reused, and logits are cached, so an interrupted run resumes where it stopped.

Under ``torchrun`` every process runs this same function (see :mod:`robustbench_ft.distributed`):
they fine-tune together and split evaluation, and only rank 0 logs, writes records and renders.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from robustbench_ft import distributed
from robustbench_ft.config import RunConfig
from robustbench_ft.datasets.build import (
    data_identity,
    ensure_dataset,
    ensure_streamed,
    prepare_suite,
    streamed_locations,
)
from robustbench_ft.datasets.fewshot import shot_data, shot_tags
from robustbench_ft.datasets.registry import get_dataset, get_suite
from robustbench_ft.evaluation.cache import ArrayCache
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.evaluation.scoring import SuiteScores, score_suite
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.resolve import ResolvedRun, resolve
from robustbench_ft.models.clip import load_clip, resolve_device, resolve_weights
from robustbench_ft.results import (
    RecordError,
    ResultRecord,
    iter_record_files,
    load_record,
    now_iso,
    software_versions,
    write_record,
)
from robustbench_ft.robustness.baseline import baseline_records, load_baseline
from robustbench_ft.robustness.effective import attach_effective_robustness
from robustbench_ft.shards.urls import describe, is_url
from robustbench_ft.util import silent, slugify, stable_hash


@dataclass
class RunOutcome:
    config: RunConfig
    records: list[ResultRecord]
    record_paths: list[Path]
    report: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    run: ResolvedRun | None = None
    name: str = ""  # the run's folder under the results and reports directories

    def __post_init__(self) -> None:
        self.name = self.name or (self.run.name if self.run else self.config.run_name or "")

    @property
    def records_dir(self) -> Path:
        return Path(self.config.results_dir) / self.name


def run(config: RunConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> RunOutcome:
    """Run a method on a suite and write its records (and report). See the module docstring.

    With ``config.seeds`` the run is repeated once per seed (training and every seeded draw change,
    nothing else); the records of seed ``s`` go to ``<results-dir>/<run>/seed-<s>/`` and one report
    shows them all (the leaderboard and the report give mean ± std over the seeds)."""
    with distributed.process_group(config.device) as world:
        if not world.is_main:  # one voice: rank 0 reports for all
            progress, log = False, silent
        if config.seeds is None:
            return _run(config, progress=progress, log=log)
        return _run_seeds(config, progress=progress, log=log)


def _run_seeds(config: RunConfig, *, progress: bool, log: Callable[[str], None]) -> RunOutcome:
    first = resolve(replace(config, seed=config.seeds[0], seeds=None))
    group = first.seeds_name
    outcomes = []
    for seed in config.seeds:
        log(f"seed {seed} ({len(outcomes) + 1} of {len(config.seeds)})")
        seeded = replace(config, seed=seed, seeds=None, report=False, run_name=f"seed-{seed}",
                         results_dir=str(Path(config.results_dir) / group))
        outcomes.append(_run(seeded, progress=progress, log=log))
    records = [r for o in outcomes for r in o.records]
    outcome = RunOutcome(config, records, [p for o in outcomes for p in o.record_paths], None,
                         {f"seed {s}": o.timings.get("total", 0.0) for s, o in zip(config.seeds, outcomes)}, first)
    outcome.name = group
    if config.report and distributed.world().is_main:
        outcome.report = render_run_report(records, first, group)
    return outcome


def _run(config: RunConfig, *, progress: bool, log: Callable[[str], None]) -> RunOutcome:
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    resolved = resolve(config)  # unknown method, suite or option, or a mistyped value: refused here
    suite = resolved.suite
    resolve_weights(config.model, config.pretrained)  # reject a bad model or tag before writing anything
    resolve_device(config.device)
    streamed = streamed_locations(suite, config.data_root, config.data_urls)  # refuses a bad URL or name here
    local = not is_url(config.data_root)
    outputs = (("data_root",) if local else ()) + ("cache_dir", "results_dir") + (("reports_dir",) if config.report
                                                                                 else ())
    for flag in outputs:
        check_writable(Path(getattr(config, flag)), flag)
    if config.tensorboard is not None:
        check_tensorboard(config.tensorboard)
    out_dir = Path(config.results_dir) / resolved.name
    claim_run_dir(out_dir, resolved)
    specs = {name: get_dataset(name) for name in suite.eval_datasets}
    root = Path(config.data_root)
    skip = config.on_bad_sample == "skip"
    with distributed.main_first():  # rank 0 builds what is missing, the others then find it
        if local:
            prepare_suite(suite, root, processes=max(1, config.workers), log=log, streamed=streamed)
        dirs = {name: ensure_streamed(spec, streamed[name]) if name in streamed else
                ensure_dataset(spec, root, "test", log=log, damaged_ok=skip) for name, spec in specs.items()}
    data = data_identity(suite, root, streamed)
    timings = {"prepare_data": time.perf_counter() - t0}

    t = time.perf_counter()
    clip = load_clip(config.model, config.pretrained, distributed.rank_device(config.device), config.precision,
                     trust_pickle=config.trust_pickle)
    ctx = MethodContext(resolved, clip, data, progress, log)
    shots = ctx.shot_subsets()  # --shots: drawn now (a class short of K is refused before anything trains)
    data.update(shot_data(shots))
    candidates = resolved.method.cls().run(ctx)
    check_candidates(config.method, candidates)
    timings["method"] = time.perf_counter() - t

    key = perturbation_key(resolved.key(data), config)
    paths = {c.name: out_dir / f"{slugify(c.name)}.json" for c in candidates}
    records = _finished_records(candidates, paths, key, skip)
    pending = [c for c in candidates if c.name not in records]
    if len(pending) < len(candidates):
        log(f"reusing {len(candidates) - len(pending)} finished record(s) in {out_dir}")
    if pending:
        t = time.perf_counter()
        options = EvalOptions.from_config(config, clip.device, progress=progress)
        scores = score_suite({c.name: c.classifier for c in pending}, specs, dirs, suite.reference,
                             clip.preprocess_eval, options, cache=ArrayCache(Path(config.cache_dir) / "logits", log),
                             features=ArrayCache(Path(config.cache_dir) / "features", log), log=log)
        timings["evaluate"] = time.perf_counter() - t
        robust = _score_perturbations(pending, config, dirs[suite.reference], clip, specs[suite.reference], timings,
                                      progress, log)
        baseline = _suite_baseline(suite.baseline)
        for c in pending:
            rec = _record(c, resolved, key, data, scores, timings, shot_tags(shots))
            rec.perturbations = robust.get(c.name, {})
            if baseline is not None:
                attach_effective_robustness(rec, baseline)
            if distributed.world().is_main:
                write_record(rec, paths[c.name])
            records[c.name] = rec
    if config.overwrite and distributed.world().is_main:
        _remove_other_records(out_dir, set(paths.values()))
    ordered = [records[c.name] for c in candidates]
    outcome = RunOutcome(config, ordered, [paths[c.name] for c in candidates], None, timings, resolved)
    if config.report and distributed.world().is_main:
        outcome.report = render_run_report(ordered, resolved)
    timings["total"] = time.perf_counter() - t0
    return outcome


def perturbation_key(key: str, config: RunConfig) -> str:
    """The run's key, extended by its perturbation shifts where it has any (records with other perturbations,
    or another attacked subset, are scored afresh; a run without them keeps its key)."""
    if not config.perturbations:
        return key
    return stable_hash([key, {"perturbations": list(config.perturbations), "attack_samples": config.attack_samples}])


def _score_perturbations(pending: list[Candidate], config: RunConfig, directory: Path | str, clip, reference,
                         timings: dict[str, float], progress: bool, log: Callable[[str], None]) -> dict[str, dict]:
    """Robust accuracy of each pending candidate under ``config.perturbations`` (docs/perturbations.md)."""
    if not config.perturbations:
        return {}
    from robustbench_ft.perturbations.evaluate import score_perturbations

    t = time.perf_counter()
    log(f"perturbations {', '.join(config.perturbations)} on {reference.name} "
        f"({config.attack_samples or 'all'} samples) for {len(pending)} candidate(s)")
    options = EvalOptions.from_config(config, clip.device, progress=progress)
    out = score_perturbations({c.name: c.classifier for c in pending}, directory, clip.preprocess_eval,
                              config.perturbations, len(reference.classnames), options,
                              samples=config.attack_samples, seed=config.seed)
    timings["perturbations"] = time.perf_counter() - t
    return out


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


def claim_run_dir(out_dir: Path, resolved: ResolvedRun) -> None:
    """Check, before any work, that ``out_dir`` may hold this run's records: a folder holding records of
    another configuration (a ``--run-name`` used before with other settings) is refused, since they
    would be overwritten or mixed in, unless ``overwrite`` asks to replace them."""
    if resolved.config.overwrite or not out_dir.is_dir():
        return
    others = set()
    for path in iter_record_files([out_dir]):
        try:
            record = load_record(path)
        except RecordError:
            continue
        if record.config_hash != resolved.hash:
            others.add(record.config_hash[:12] or "(none)")
    if others:
        raise FileExistsError(f"{out_dir} holds records of another configuration (config {', '.join(sorted(others))}; "
                              f"this run is {resolved.hash[:12]}); choose another --run-name, or pass --overwrite to "
                              "replace them")


def check_candidates(method: str, candidates: list[Candidate]) -> None:
    if not candidates:
        raise RuntimeError(f"method {method!r} produced no candidate")
    names = [c.name for c in candidates]
    slugs = [slugify(n) for n in names]
    if len(set(slugs)) != len(slugs):  # names become file names: two that slugify alike would overwrite
        raise RuntimeError(f"method {method!r} produced candidate names that are not distinct: {names}")


def record_id(key: str, candidate: str) -> str:
    """A record's id: the run's key (identity and data) and the candidate's name."""
    return stable_hash([key, candidate])[:16]


def _finished_records(candidates: list[Candidate], paths: dict[str, Path], key: str,
                      skip: bool) -> dict[str, ResultRecord]:
    """The records of this exact run, data and candidate already written (final; a resumed run keeps them)."""
    records = {}
    for c in candidates:
        try:
            existing = load_record(paths[c.name]) if paths[c.name].is_file() else None
        except RecordError:
            existing = None
        # one that skipped unreadable samples is final only for a run that skips them too
        if (existing is not None and existing.record_id == record_id(key, c.name)
                and (skip or not existing.skipped_samples)):
            records[c.name] = existing
    return records


def _record(c: Candidate, resolved: ResolvedRun, key: str, data: dict[str, str], scores: SuiteScores,
            timings: dict[str, float], shots: dict | None = None) -> ResultRecord:
    config, suite = resolved.config, resolved.suite
    return ResultRecord(
        record_id=record_id(key, c.name), suite=suite.name, model=config.model, pretrained=config.pretrained,
        method=resolved.method.name, candidate=c.name, reference=suite.reference, shifts=list(suite.shifts),
        metrics=scores.metrics[c.name], primary_metric={n: get_dataset(n).metric for n in suite.eval_datasets},
        tags=_as_json({**c.tags, **(shots or {})}), config=_as_json({**_shareable(config), "resolved": resolved.identity}),
        config_hash=resolved.hash,
        versions=software_versions(),
        timings={**{k: round(v, 3) for k, v in timings.items()},
                 **{f"eval_{n}": round(s, 3) for n, s in scores.seconds.items()}, **_training_timings(c)},
        created=now_iso(), skipped_samples=scores.skipped, data=data, training=_training_of(c),
    )


# Facts of one execution rather than of the training (a resumed run has others, the same curve and
# weights): they go to the record's timings, as train_peak_<kind>_mb and train_resumed_from_step.
_EXECUTION_FACTS = ("peak_memory_bytes", "peak_memory_kind", "resumed_from_step", "curve_file")
_PEAK_KEYS = {"cuda_max_allocated": "train_peak_cuda_allocated_mb", "process_max_rss": "train_peak_process_rss_mb"}


def _training_provenance(c: Candidate) -> dict:
    info = getattr(c.classifier, "info", None)
    training = getattr(info, "provenance", {}).get("training") if info is not None else None
    return training if isinstance(training, dict) else {}


def _training_of(c: Candidate) -> dict:
    """How the candidate's classifier was trained (its provenance from :func:`methods.training.train`), or {}:
    global batch, accumulation, devices, steps, the curve. Not the curve file's local path (the record
    carries the curve itself) nor the facts of one execution (see :func:`_training_timings`)."""
    return _as_json({k: v for k, v in _training_provenance(c).items() if k not in _EXECUTION_FACTS})


def _training_timings(c: Candidate) -> dict[str, float]:
    """Peak memory of the candidate's training (MiB; CUDA: most allocated on the device, CPU: the process's
    peak resident size) and the step a resumed training started from, for the record's timings."""
    training, out = _training_provenance(c), {}
    if isinstance(training.get("peak_memory_bytes"), int) and training.get("peak_memory_kind") in _PEAK_KEYS:
        out[_PEAK_KEYS[training["peak_memory_kind"]]] = round(training["peak_memory_bytes"] / 2 ** 20, 1)
    if isinstance(training.get("resumed_from_step"), int):
        out["train_resumed_from_step"] = training["resumed_from_step"]
    return out


def _shareable(config: RunConfig) -> dict:
    """The config as a record keeps it: URLs without their query strings (signed object-storage links
    carry credentials there, and records are shared)."""
    out = config.to_dict()
    out["data_root"] = describe(config.data_root)
    out["data_urls"] = {k: describe(v) for k, v in config.data_urls.items()}
    return out


def check_tensorboard(directory: str) -> None:
    """``--tensorboard DIR`` needs the tensorboard package, which the harness does not depend on."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError(f"--tensorboard {directory}: TensorBoard event files need the tensorboard package, "
                                  "which is optional and not installed (pip install tensorboard); the fine-tuning "
                                  "curves are stored beside each checkpoint and shown in the report without it"
                                  ) from None
    check_writable(Path(directory), "tensorboard")


def _as_json(value: dict) -> dict:
    """``value`` as it reads back from a record file (tuples as lists), so a fresh record equals a reused one."""
    return json.loads(json.dumps(value, default=str))


def _remove_other_records(out_dir: Path, keep: set[Path]) -> None:
    """With ``--overwrite``: the folder's records that this run did not write go (another config's)."""
    for path in iter_record_files([out_dir]):
        if path not in keep:
            path.unlink(missing_ok=True)


def _suite_baseline(name: str | None):
    return None if name is None else load_baseline(name)


def render_run_report(records: list[ResultRecord], resolved: ResolvedRun, name: str | None = None) -> Path:
    """The run's HTML report, with the suite's baseline models drawn behind the candidates."""
    from robustbench_ft.report import render_report  # matplotlib: imported only when a report is drawn

    config, baseline_name = resolved.config, resolved.suite.baseline
    shown = records + (baseline_records(baseline_name) if baseline_name else [])
    return render_report(shown, Path(config.reports_dir) / (name or resolved.name),
                         baseline=_suite_baseline(baseline_name),
                         title=f"{resolved.method.name} on {config.suite} ({config.model}, {config.pretrained})")


def render_grid_report(records: list[ResultRecord], config: RunConfig, name: str) -> Path:
    """One report of a model grid's records (every pair), with the suite's baseline models behind them."""
    from robustbench_ft.report import render_report
    from robustbench_ft.robustness.baseline import baseline_records

    baseline_name = get_suite(config.suite).baseline
    shown = records + (baseline_records(baseline_name) if baseline_name else [])
    models = len({(r.model, r.pretrained) for r in records})
    return render_report(shown, Path(config.reports_dir) / name, baseline=_suite_baseline(baseline_name),
                         title=f"{config.method} on {config.suite}: {models} models")
