"""Faults that must never lose or corrupt results (issue 8, items 1 and 2).

Kill and resume: a run is SIGKILLed at a seeded random point (during fine-tuning, while saving the
fine-tuned checkpoint, during evaluation, while writing records); the rerun finishes with exactly the
records an uninterrupted run makes, with no duplicate or truncated file, and recomputes nothing that
was finished (counted: optimiser steps, encoder passes, record writes).

Concurrency: runs with the same and with different configs writing into one results directory, one
data root and one cache at once; concurrent builds of one dataset split; concurrent writers of one
logits-cache entry and of one record file.

The faulty process is a fork of the test process (torch is imported once, so each case costs about
a second); the fault is injected by patching, inside that child only, the function at which it should
strike. Nothing in the package exists for these tests.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from robustbench_ft import RunConfig, run
from robustbench_ft.methods.resolve import resolve
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.results import ResultRecord, iter_record_files, load_record, load_records, write_record

FORK = multiprocessing.get_context("fork")
TINY = dict(model="rbft-tiny-vit", pretrained="random", suite="synthetic", report=False)
# select=False: the encoder passes counted below are those of the test evaluation (the choice of α on val
# is a pass of its own, cached the same way; tests/test_protocol.py covers it)
WISE = dict(method="wise-ft", method_options={"alpha": "0.5", "select": False, "base_options": {"max_steps": 4}})
TRAIN_STEPS = 4
CANDIDATES = ("zeroshot", "finetune", "wise-ft α=0.50")
EVAL_PASSES = 3 * 2 * 2   # encoder passes: 3 candidates' encoders x 2 datasets x 2 batches of 16 (24 images each)
# fields that differ between two runs of one config by design (where, when, how long)
VOLATILE = ("config", "timings", "created")


class Counters:
    """Counts the work a run does, at the same points where the faults strike:
    optimiser steps, image-encoder passes during evaluation, record files moved into place."""

    def __init__(self, monkeypatch, kill: tuple[str, int] | None = None):
        self.counts = {"train": 0, "checkpoint": 0, "eval": 0, "write": 0}
        self.kill = kill
        step, features, replace = torch.optim.AdamW.step, Classifier.features, os.replace
        counters = self

        def counted_step(opt, *args, **kwargs):
            counters.tick("train")
            return step(opt, *args, **kwargs)

        def counted_features(clf, images):
            if not torch.is_grad_enabled():  # evaluation runs under no_grad, training does not
                counters.tick("eval")
            return features(clf, images)

        def counted_replace(src, dst, *args, **kwargs):
            dst_path = Path(dst)
            if dst_path.suffix == ".json" and dst_path.parent.name == "checkpoints":
                counters.tick("checkpoint")  # the sidecar goes last: weights written, sidecar not yet
            elif dst_path.suffix == ".json" and "results" in dst_path.parts:
                counters.tick("write")  # temporary file complete, not yet renamed into place
            return replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
        monkeypatch.setattr(Classifier, "features", counted_features)
        monkeypatch.setattr(os, "replace", counted_replace)

    def tick(self, what: str) -> None:
        self.counts[what] += 1
        if self.kill == (what, self.counts[what]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit, no flush: as a power cut or OOM kill


def _killed_run(config: RunConfig, phase: str, at: int) -> None:
    """The child process: run ``config`` and die by SIGKILL at the ``at``-th ``phase`` event."""
    mp = pytest.MonkeyPatch()
    Counters(mp, kill=(phase, at))
    run(config, progress=False, log=lambda m: None)
    os._exit(0)  # reached only if the kill point was never hit


def _in_child(target, *args) -> int:
    proc = FORK.Process(target=target, args=args)
    proc.start()
    proc.join(120)
    return proc.exitcode


def _stable(record: ResultRecord) -> dict:
    return {k: v for k, v in record.to_dict().items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    """The records of an uninterrupted run, by candidate."""
    root = tmp_path_factory.mktemp("reference")
    dirs = dict(data_root=str(root / "data"), cache_dir=str(root / "cache"), results_dir=str(root / "results"),
                reports_dir=str(root / "reports"), workers=0, eval_batch_size=16)
    out = run(RunConfig(**TINY, **WISE, **dirs), progress=False, log=lambda m: None)
    assert [r.candidate for r in out.records] == list(CANDIDATES)
    return {r.candidate: _stable(r) for r in out.records}


def _assert_exactly_the_reference_records(results_dir: Path, reference: dict[str, dict]) -> None:
    files = iter_record_files([results_dir])  # visible files; a killed atomic write leaves only a hidden temp
    assert len(files) == len(CANDIDATES)
    for path in files:
        json.loads(path.read_text())  # complete JSON
    records = {r.candidate: _stable(r) for r in load_records([results_dir])}
    assert records == reference


KILL_POINTS = {"train": TRAIN_STEPS, "checkpoint": 1, "eval": EVAL_PASSES, "write": len(CANDIDATES)}
# (phase, seed, --checkpoint-every): 500 never saves training state in 4 steps (the rerun restarts
# training state), 1 saves it after every step (the rerun resumes mid-training). The seeds pick kill
# points on both sides of each boundary: eval 7 and 5 (after / before the first dataset's logits are
# cached), write 3 and 1 (with and without finished records), train 4, 3 and 3, 2.
SEEDS = {"train": (0, 1), "checkpoint": (0,), "eval": (0, 4), "write": (0, 1)}
CASES = [(phase, seed, 500) for phase, seeds in SEEDS.items() for seed in seeds] + [("train", s, 1) for s in (2, 3)]


@pytest.mark.parametrize("phase, seed, every", CASES, ids=[f"{p}-seed{s}-every{e}" for p, s, e in CASES])
def test_kill_at_a_random_point_then_rerun_gives_the_uninterrupted_records(run_dirs, reference, monkeypatch,
                                                                           phase, seed, every):
    at = random.Random(f"{phase}-{seed}").randint(1, KILL_POINTS[phase])
    config = RunConfig(**TINY, **WISE, **run_dirs, checkpoint_every=every)
    assert _in_child(_killed_run, config, phase, at) == -signal.SIGKILL
    results = Path(run_dirs["results_dir"])
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in iter_record_files([results])} \
        if results.exists() else {}
    assert len(before) == (at - 1 if phase == "write" else 0)  # records appear only when finished

    logs: list[str] = []
    counters = Counters(monkeypatch)
    run(config, progress=False, log=logs.append)
    _assert_exactly_the_reference_records(results, reference)

    done = counters.counts
    if phase == "train":  # restarted, or resumed after the last step finished before the kill
        assert done["train"] == (TRAIN_STEPS if every > TRAIN_STEPS else TRAIN_STEPS - (at - 1))
    else:  # the fine-tuned checkpoint was stored before the kill (or is retrained if the kill hit its save)
        assert done["train"] == (TRAIN_STEPS if phase == "checkpoint" else 0)
    if phase == "eval":  # logits of a dataset finished before the kill come from the cache
        assert done["eval"] == EVAL_PASSES - (EVAL_PASSES // 2 if at > EVAL_PASSES // 2 else 0)
    if phase == "write":  # finished records are kept as they are, not recomputed or rewritten
        assert done["eval"] == 0 and done["write"] == len(CANDIDATES) - (at - 1)
        after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in iter_record_files([results])}
        assert all(after[name] == kept for name, kept in before.items())
        if at > 1:
            assert any(f"reusing {at - 1} finished record(s)" in m for m in logs)


def test_rerun_after_finishing_recomputes_nothing(run_dirs, monkeypatch):
    config = RunConfig(**TINY, **WISE, **run_dirs)
    run(config, progress=False, log=lambda m: None)
    counters = Counters(monkeypatch)
    run(config, progress=False, log=lambda m: None)
    assert counters.counts == {"train": 0, "checkpoint": 0, "eval": 0, "write": 0}


# --------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------

def _plain_run(config: RunConfig) -> None:
    run(config, progress=False, log=lambda m: None)
    os._exit(0)


def test_concurrent_runs_share_results_data_and_cache(run_dirs, reference):
    """Two runs of one config and one of another, started together on one results directory, one
    (unbuilt) data root and one cache: all succeed, and every record is whole and appears once."""
    same = RunConfig(**TINY, **WISE, **run_dirs)
    other = RunConfig(**TINY, method="zeroshot", **run_dirs)
    procs = [FORK.Process(target=_plain_run, args=(c,)) for c in (same, same, other)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    results = Path(run_dirs["results_dir"])
    _assert_exactly_the_reference_records(results / resolve(same).name, reference)
    others = load_records([results / resolve(other).name])
    assert [r.candidate for r in others] == ["zeroshot"]
    assert others[0].metrics == reference["zeroshot"]["metrics"]  # same model, same data
    assert len(iter_record_files([results])) == len(CANDIDATES) + 1
    assert not [p for p in results.rglob("*") if p.name.startswith(".")]  # no temporary file left behind


def _build_in_child(data_root: str, marker_dir: str) -> None:
    from conftest import synth_builder

    from robustbench_ft.datasets.build import ensure_dataset
    from robustbench_ft.datasets.spec import DatasetSpec

    def counted_build(out_dir):
        (Path(marker_dir) / f"build-{os.getpid()}").touch()
        time.sleep(0.3)  # widen the window in which the other process would start a second build
        return synth_builder(12, 9)(out_dir)

    spec = DatasetSpec("concurrent", ("red", "green", "blue"), ("{}",), builders={"test": counted_build})
    ensure_dataset(spec, Path(data_root), "test", log=lambda m: None)
    os._exit(0)


def test_concurrent_builds_of_one_split_build_it_once(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    procs = [FORK.Process(target=_build_in_child, args=(str(tmp_path / "data"), str(markers))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(list(markers.iterdir())) == 1
    from robustbench_ft.shards.verify import verify_shards

    assert verify_shards(tmp_path / "data" / "concurrent" / "test").num_samples == 12


def _put_many(root: str, seed: int, n: int) -> None:
    from robustbench_ft.evaluation.cache import ArrayCache

    cache = ArrayCache(root)
    key = cache.path("c" * 20, "m" * 20, "t")
    rng = np.random.default_rng(seed)
    for _ in range(n):
        cache.put(key, rng.normal(size=(64, 10)).astype(np.float32), np.arange(64))
    os._exit(0)


def test_concurrent_writers_of_one_cache_entry(tmp_path):
    """Each writer has its own temporary file: no writer fails or publishes a mix of two files."""
    procs = [FORK.Process(target=_put_many, args=(str(tmp_path), seed, 150)) for seed in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    from robustbench_ft.evaluation.cache import ArrayCache

    cache = ArrayCache(tmp_path)
    logits, labels = cache.get(cache.path("c" * 20, "m" * 20, "t"))
    assert logits.shape == (64, 10) and list(labels) == list(range(64))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def _write_many(path: str, seed: int, n: int) -> None:
    for i in range(n):
        write_record(ResultRecord(record_id="r", suite="synthetic", model="m", pretrained="p", method="x",
                                  candidate=f"writer {seed} version {i}", reference="synth", shifts=[],
                                  metrics={"synth": {"top1": 0.5, "n": 24}}), Path(path))
    os._exit(0)


def test_concurrent_writers_and_a_reader_of_one_record(tmp_path):
    path = tmp_path / "r.json"
    write_record(ResultRecord(record_id="r", suite="synthetic", model="m", pretrained="p", method="x",
                              candidate="initial", reference="synth", shifts=[],
                              metrics={"synth": {"top1": 0.5, "n": 24}}), path)
    procs = [FORK.Process(target=_write_many, args=(str(path), seed, 150)) for seed in range(2)]
    for p in procs:
        p.start()
    seen = set()
    while any(p.is_alive() for p in procs):
        seen.add(load_record(path).candidate)  # never a truncated or interleaved file
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert load_record(path).candidate in {"writer 0 version 149", "writer 1 version 149"}
    assert len(seen) > 1
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
