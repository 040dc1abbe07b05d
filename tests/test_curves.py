"""Training you can look at: the loss / lr / grad-norm curve beside the checkpoint, whole after a resume,
in the records and the report; TensorBoard only when the package is there."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from robustbench_ft import RunConfig, run
from robustbench_ft.methods.curves import TrainingCurve
from robustbench_ft.methods.training import Batch, Checkpointing, OptimConfig, cross_entropy, mean_loss, train
from robustbench_ft.results import ResultRecord, load_records

TINY = dict(model="rbft-tiny-vit", pretrained="random", suite="synthetic")


class _Data:
    batches_per_epoch = 3
    batch_size = 4

    def epoch(self, epoch: int, start_batch: int = 0):
        g = torch.Generator().manual_seed(epoch)
        batches = [[torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g), torch.arange(4)]
                   for _ in range(self.batches_per_epoch)]
        return batches[start_batch:]


def _stop_at(objective, step: int):
    calls = iter(range(10 ** 6))

    def stopping(ctx, batch: Batch):
        if next(calls) == step:
            raise RuntimeError("stop")
        return objective(ctx, batch)

    return stopping


def _train(tmp_path: Path, objective, **kw) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2, grad_clip=kw.pop("grad_clip", 1.0), total_steps=7)
    keep = Checkpointing(tmp_path / "run.training.pt", every=2, curve=tmp_path / "run.curve.csv")
    return train(model, _Data(), cfg, objective, device=torch.device("cpu"), progress=False, checkpointing=keep,
                 log=lambda m: None, **kw)


def test_a_resumed_run_has_the_whole_curve_of_an_uninterrupted_one(tmp_path):
    whole = _train(tmp_path / "a", mean_loss(cross_entropy()))
    with pytest.raises(RuntimeError, match="stop"):
        _train(tmp_path / "b", _stop_at(mean_loss(cross_entropy()), 5))  # killed after the state of step 4
    partial = pd.read_csv(tmp_path / "b" / "run.curve.csv")
    assert partial.step.tolist() == [0, 1, 2, 3]  # written with each resumable state
    resumed = _train(tmp_path / "b", mean_loss(cross_entropy()))
    assert resumed["resumed_from_step"] == 4
    assert resumed["curve"] == whole["curve"] and resumed["curve"]["step"] == list(range(7))
    on_disk = pd.read_csv(tmp_path / "b" / "run.curve.csv")
    assert {k: on_disk[k].tolist() for k in ("step", "loss", "lr", "grad_norm")} == whole["curve"]
    assert whole["curve"]["lr"][:2] == [5e-3, 1e-2] and all(g > 0 for g in whole["curve"]["grad_norm"])
    assert whole["global_batch"] == 4 and whole["devices"] == 1 and whole["accum_steps"] == 1
    assert whole["peak_memory_bytes"] > 0 and whole["peak_memory_kind"] == "process_max_rss"
    unclipped = _train(tmp_path / "c", mean_loss(cross_entropy()), grad_clip=0.0)
    assert unclipped["curve"]["grad_norm"][0] == pytest.approx(whole["curve"]["grad_norm"][0])
    long = TrainingCurve(list(range(1000)), [1.0] * 1000, [0.1] * 1000, [None] * 1000)
    down = long.downsampled(200)
    assert len(down["step"]) == 200 and down["step"][0] == 0 and down["step"][-1] == 999


def test_a_finetune_run_records_how_it_trained_and_its_report_draws_the_curve(run_dirs):
    config = RunConfig(**TINY, **{**run_dirs, "reports_dir": run_dirs["reports_dir"]}, method="wise-ft",
                       method_options={"alpha": (0.5,)}, report=True, checkpoint_every=2)
    outcome = run(config, progress=False, log=lambda m: None)
    by_name = {r.candidate: r for r in outcome.records}
    assert by_name["zeroshot"].training == {}
    facts = by_name["finetune"].training
    assert facts["global_batch"] == 8 and facts["devices"] == 1 and facts["micro_batch"] == 8
    assert len(facts["curve"]["step"]) == facts["steps"] == 6 and "curve_file" not in facts
    assert by_name["wise-ft α=0.50"].training == facts and "peak_memory_bytes" not in facts
    assert by_name["finetune"].timings["train_peak_process_rss_mb"] > 0
    (curve_file,) = (Path(run_dirs["cache_dir"]) / "checkpoints").glob("finetune-*.curve.csv")
    assert curve_file.with_name(curve_file.name.replace(".curve.csv", ".safetensors")).is_file()
    stored = {r.candidate: r for r in load_records([outcome.records_dir])}
    assert stored["finetune"].training == facts
    page = outcome.report.read_text()
    assert 'id="training"' in page and page.count('alt="training curve:') == 1  # one figure for all three
    assert "training of wise-ft α chosen on val, wise-ft α=0.50, finetune" in page
    assert (outcome.report.parent / "figures" / "training-0.svg").is_file()
    bad = stored["finetune"].to_dict()
    bad["training"]["curve"]["loss"] = bad["training"]["curve"]["loss"][:-1]
    with pytest.raises(ValueError, match=r"\['curve'\] must be an object of step/loss/lr/grad_norm lists of one length"):
        ResultRecord.from_dict(bad)


def test_tensorboard_events_only_with_the_package(run_dirs, tmp_path, monkeypatch):
    options = {"method": "finetune", "method_options": {"max_steps": 2}, "report": False}
    board = tmp_path / "tb"
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ModuleNotFoundError, match="need the tensorboard package, which is optional and not installed"):
        run(RunConfig(**TINY, **run_dirs, **options, tensorboard=str(board)), progress=False, log=lambda m: None)
    scalars = []

    class Writer:
        def __init__(self, log_dir):
            scalars.append(("dir", Path(log_dir).parent))

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def flush(self):
            pass

        close = flush

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    run(RunConfig(**TINY, **run_dirs, **options, tensorboard=str(board)), progress=False, log=lambda m: None)
    assert scalars[0] == ("dir", board)
    assert [s for s in scalars[1:] if s[1] == 1] == [("train/loss", 1), ("train/lr", 1), ("train/grad_norm", 1)]
