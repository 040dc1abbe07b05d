"""Training at scale: worker-independent data order, gradient accumulation, resume after SIGKILL,
DDP (two gloo processes) against one process, and bf16 autocast on CPU."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTH_CLASSES, synth_image
from safetensors.torch import load_file
from torchvision import transforms

from robustbench_ft import RunConfig, run
from robustbench_ft.cli import main
from robustbench_ft.evaluation.dataset_pass import evaluate
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.loading.training_batches import INDEX_FILE, ShardSamples, TrainingBatches, rank_indices
from robustbench_ft.methods.flyp import CaptionedContrastiveLoss
from robustbench_ft.methods.training import (
    Batch,
    Checkpointing,
    OptimConfig,
    Step,
    cross_entropy,
    mean_loss,
    train,
)
from robustbench_ft.models import load_clip
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.shards.manifest import ShardError
from robustbench_ft.shards.writer import write_shards

TINY = dict(model="rbft-tiny-vit", pretrained="random", suite="synthetic", report=False)
SCRIPT = Path(__file__).parent / "synthetic_run.py"
AUGMENT = transforms.Compose([transforms.RandomResizedCrop(16, scale=(0.3, 1.0)), transforms.RandomHorizontalFlip(),
                              transforms.ToTensor()])


def _shards(directory: Path, n: int = 30, per_shard: int = 7) -> Path:
    rng = np.random.default_rng(0)
    write_shards(((f"k{i:03d}", synth_image(i % 3, rng), i % 3, None) for i in range(n)), directory, "train",
                 SYNTH_CLASSES, samples_per_shard=per_shard)
    return directory


def _batches(data: TrainingBatches, epoch: int, start: int = 0) -> list[list[torch.Tensor]]:
    return [list(b) for b in data.epoch(epoch, start)]


def _same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))


# --- data order ---------------------------------------------------------------------------------

def test_training_batches_are_the_same_for_any_worker_count(tmp_path):
    directory = _shards(tmp_path / "train")
    runs = {w: TrainingBatches(directory, AUGMENT, 4, seed=3, workers=w) for w in (0, 1, 2)}
    epoch0 = {w: _batches(d, 0) for w, d in runs.items()}
    assert len(epoch0[0]) == 30 // 4  # full batches only
    assert _same(epoch0[0], epoch0[1]) and _same(epoch0[0], epoch0[2])
    assert _same(_batches(runs[0], 1), _batches(runs[2], 1))
    assert not _same(epoch0[0], _batches(runs[0], 1))  # a new order and new augmentations every epoch
    labels = torch.cat([b[1] for b in epoch0[0]])
    seen = sorted(int(s) for b in epoch0[0] for s in b[2])
    assert len(set(seen)) == len(seen) == 28 and labels.bincount().tolist() != []
    # resuming mid-epoch gives the remaining batches of the same epoch, augmentations included
    assert _same(_batches(runs[1], 1, start=3), _batches(runs[0], 1)[3:])


def test_ranks_take_disjoint_slices_of_every_global_batch(tmp_path):
    directory = _shards(tmp_path / "train")
    whole = _batches(TrainingBatches(directory, AUGMENT, 6, seed=1), 2)
    ranks = [_batches(TrainingBatches(directory, AUGMENT, 6, seed=1, rank=r, world_size=2, workers=r), 2)
             for r in (0, 1)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 5
    for b, full in enumerate(whole):
        for field in range(3):
            assert torch.equal(torch.cat([ranks[0][b][field], ranks[1][b][field]]), full[field])
    order = rank_indices(30, 6, 1, 2)
    assert sorted(order) == sorted(set(order)) and len(order) == 30  # a permutation, one sample left out
    with pytest.raises(ValueError, match="not a multiple of the number of processes 4"):
        TrainingBatches(directory, AUGMENT, 6, seed=1, rank=0, world_size=4)


def test_sample_index_is_stored_with_the_manifest_and_damage_names_the_shard(tmp_path):
    directory = _shards(tmp_path / "train")
    samples = ShardSamples(directory, transforms.ToTensor())
    assert (directory / INDEX_FILE).is_file()
    image, label, _ = samples[9]
    assert label == 0 and image.shape == (3, 32, 32)
    # a rebuilt set (other images under the same directory) is indexed again, not read at stale offsets
    rng = np.random.default_rng(5)
    write_shards(((f"x{i}", synth_image(2, rng), 2, None) for i in range(4)), directory, "train", SYNTH_CLASSES)
    assert [ShardSamples(directory)[i][1] for i in range(4)] == [2, 2, 2, 2]
    bad = _shards(tmp_path / "bad")
    shard = bad / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(ShardError, match="train-000001.tar"):
        ShardSamples(bad, verify="none")  # the scan itself finds the damage


# --- gradient accumulation -----------------------------------------------------------------------

class _FixedData:
    """TrainingData over a fixed list of batches (the same every epoch)."""

    def __init__(self, batches: list[Batch]):
        self.batches = batches
        self.batches_per_epoch = len(batches)

    def epoch(self, epoch: int, start_batch: int = 0):
        return [list(b) for b in self.batches[start_batch:]]


def _tiny_batches(n: int = 3) -> list[Batch]:
    gen = torch.Generator().manual_seed(0)
    return [Batch(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen),
                  torch.arange(8) + 8 * i) for i in range(n)]


def test_accumulated_micro_batches_give_the_update_of_one_big_batch():
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    weights = {}
    for accum in (1, 2, 4):
        model = copy.deepcopy(start)
        cfg = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=1, grad_clip=1.0, total_steps=3, accum_steps=accum)
        train(model, _FixedData(_tiny_batches()), cfg, mean_loss(cross_entropy()), device=torch.device("cpu"),
              progress=False)
        weights[accum] = [p.detach().clone() for p in model.parameters()]
    assert not torch.equal(weights[1][0], start[0].weight)
    for accum in (2, 4):
        for a, b in zip(weights[1], weights[accum]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_saved_state_for_another_model_is_refused_naming_the_file(tmp_path):
    torch.manual_seed(0)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=1, grad_clip=1.0, total_steps=3)
    keep = Checkpointing(tmp_path / "run.training.pt", every=1)
    small = torch.nn.Sequential(torch.nn.Linear(6, 3))
    with pytest.raises(RuntimeError, match="stop"):  # stop after the state of step 1 is saved
        train(small, _FixedData(_tiny_batches()), cfg, _stop_at_step(mean_loss(cross_entropy()), 2),
              device=torch.device("cpu"), progress=False, checkpointing=keep)
    assert keep.path.is_file()
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match=r"run\.training\.pt does not fit this run .*delete the file"):
        train(other, _FixedData(_tiny_batches()), cfg, mean_loss(cross_entropy()), device=torch.device("cpu"),
              progress=False, checkpointing=keep)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))  # nothing half-loaded


def _stop_at_step(objective, step: int):
    calls = iter(range(10**6))

    def stopping(ctx, batch):
        if next(calls) == step:
            raise RuntimeError("stop")
        return objective(ctx, batch)

    return stopping


def test_flyp_accumulation_keeps_every_negative_and_counts_the_temperature_once():
    torch.manual_seed(0)
    clip = load_clip("rbft-tiny-vit", "random")
    loss = CaptionedContrastiveLoss(clip.tokenizer, list(SYNTH_CLASSES), ["a {}.", "the {} one."])
    batch = Batch(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))
    grads = {}
    for accum in (1, 3):
        model = copy.deepcopy(clip.model).train()
        value = loss(Step(model, accum, torch.device("cpu"), "fp32"), batch)
        grads[accum] = (value, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[1][0] == pytest.approx(grads[3][0], rel=1e-6)
    assert grads[1][1].keys() == grads[3][1].keys() and "logit_scale" in grads[1][1]
    for name, g in grads[1][1].items():
        torch.testing.assert_close(grads[3][1][name], g, rtol=1e-4, atol=1e-6)


# --- bf16 autocast on CPU ------------------------------------------------------------------------

def test_bf16_autocast_trains_and_evaluates_on_cpu(tmp_path):
    torch.manual_seed(0)
    clip = load_clip("rbft-tiny-vit", "random", precision="amp_bf16")
    model = Classifier.zeroshot(clip, list(SYNTH_CLASSES), ["a {}."])
    directory = _shards(tmp_path / "train", n=16, per_shard=8)
    data = TrainingBatches(directory, clip.preprocess_train, 8, seed=0)
    summary = train(model, data, OptimConfig(1e-3, 0.1, 1, 1.0, 2, accum_steps=2), mean_loss(cross_entropy()),
                    device=torch.device("cpu"), precision="amp_bf16", progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    preds = evaluate({"m": model}, directory, clip.preprocess_eval, EvalOptions(batch_size=8, precision="amp_bf16", progress=False))
    assert np.isfinite(preds.logits["m"]).all() and preds.logits["m"].shape == (16, 3)
    exact = evaluate({"m": model}, directory, clip.preprocess_eval, EvalOptions(batch_size=8, progress=False)).logits["m"]
    assert not np.array_equal(exact, preds.logits["m"])  # autocast really ran in bf16 ...
    np.testing.assert_allclose(preds.logits["m"], exact, rtol=0.05, atol=0.1)  # ... to bf16 precision


# --- resume after SIGKILL -------------------------------------------------------------------------

FT = {"epochs": 5, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "max_steps": 10}


def _flags(dirs: dict, options: dict, method: str = "finetune") -> list[str]:
    args = ["run", "--method", method, "--model", TINY["model"], "--pretrained", TINY["pretrained"],
            "--suite", "synthetic", "--no-report", "--device", "cpu"]
    for key, value in {**dirs, **options}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _trained(cache_dir: str, method: str = "finetune") -> dict[str, torch.Tensor]:
    (path,) = (Path(cache_dir) / "checkpoints").glob(f"{method}-*.safetensors")
    return load_file(str(path))


def _training_summary(cache_dir: str, method: str) -> dict:
    (path,) = (Path(cache_dir) / "checkpoints").glob(f"{method}-*.json")
    return json.loads(path.read_text())["provenance"]["training"]


@pytest.mark.slow
def test_run_killed_mid_training_resumes_to_the_uninterrupted_result(run_dirs, tmp_path, capsys):
    flags = _flags(run_dirs, {**FT, "checkpoint_every": 4})
    env = {**os.environ, "RBFT_TEST_KILL_AT_STEP": "7"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoints = Path(run_dirs["cache_dir"]) / "checkpoints"
    # no finished classifier: the resumable state, and the curve so far (written with it)
    assert sorted(p.name.split(".", 1)[1] for p in checkpoints.iterdir()) == ["curve.csv", "training.pt"]

    assert main([*flags, "--workers", "2"]) == 0  # the same config (the worker count is not part of it)
    assert "resuming from step 4 (epoch 0, batch 4)" in capsys.readouterr().out
    assert not list(checkpoints.glob("*.training.pt"))  # the state goes once the classifier is stored

    fresh = {**run_dirs, "cache_dir": str(tmp_path / "fresh"), "results_dir": str(tmp_path / "fresh-results")}
    assert main(_flags(fresh, {**FT, "checkpoint_every": 0})) == 0
    a, b = _trained(run_dirs["cache_dir"]), _trained(fresh["cache_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert _metrics(run_dirs["results_dir"]) == _metrics(fresh["results_dir"])


def _metrics(results_dir: str) -> dict:
    (record,) = Path(results_dir).rglob("*.json")
    return json.loads(record.read_text())["metrics"]


# --- DDP: two gloo processes against one ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["finetune", "l2-sp", "flyp", "ftp"])  # spd, digrap pass too (issue 14 notes)
def test_two_process_ddp_run_matches_one_process(run_dirs, tmp_path, method):
    """Global batch 8 = 2 ranks × 4 (× 2 micro-batches each): DDP's averaged gradient is the one-process
    gradient up to float rounding, so the losses agree to 1e-5, the weights to 2e-5 (lr 1e-3) and the
    metrics (evaluation split by shard across ranks, logits summed back) are the same numbers. FLYP's
    contrastive loss sees the negatives of both ranks (features gathered), so it too is the one-process
    loss. Left out: attention key biases. Their gradient is zero in exact arithmetic (softmax ignores a
    shift), and Adam, dividing each gradient by its own magnitude, turns its rounding noise into steps."""
    options = {**FT, "max_steps": 4, "accum_steps": 2}
    one = run(RunConfig(method=method, method_options=options, **TINY, **run_dirs), progress=False,
              log=lambda m: None)
    two_dirs = {**run_dirs, "cache_dir": str(tmp_path / "ddp-cache"), "results_dir": str(tmp_path / "ddp-results")}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(SCRIPT), *_flags(two_dirs, options, method)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = _trained(run_dirs["cache_dir"], method), _trained(two_dirs["cache_dir"], method)
    for key in a:
        keep = torch.ones(len(a[key]), dtype=torch.bool)
        if key.endswith("attn.in_proj_bias"):  # [query; key; value] biases
            keep[len(keep) // 3: 2 * len(keep) // 3] = False
        torch.testing.assert_close(b[key][keep], a[key][keep], rtol=0, atol=2e-5)
    training = [_training_summary(d["cache_dir"], method) for d in (run_dirs, two_dirs)]
    assert training[1]["steps"] == training[0]["steps"] == 4
    assert training[1]["final_loss"] == pytest.approx(training[0]["final_loss"], rel=1e-5)
    metrics = _metrics(two_dirs["results_dir"])
    for dataset, scores in one.records[0].metrics.items():
        assert metrics[dataset]["n"] == scores["n"]
        assert metrics[dataset]["top1"] == pytest.approx(scores["top1"], abs=1e-9)
    assert proc.stdout.count("records:") == 1  # rank 0 alone reports


def test_cpu_training_keeps_loader_workers_off_the_cores_torch_computes_on(monkeypatch):
    from robustbench_ft.methods.finetune import training_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert training_workers(4, torch.device("cpu")) == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert training_workers(4, torch.device("cpu")) == 2 and training_workers(1, torch.device("cpu")) == 1
    assert training_workers(4, torch.device("cuda")) == 4  # GPU: the cores are free for loading
