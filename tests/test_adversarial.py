"""Adversarial fine-tuning (pgd-at, trades) on the tiny random model and the synthetic suite."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustbench_ft import RunConfig
from robustbench_ft.methods.adversarial import AdversarialOptions, PgdAT, PixelBall, Trades, pgd
from robustbench_ft.methods.context import MethodContext
from robustbench_ft.methods.finetune import Finetune
from robustbench_ft.methods.resolve import resolve
from robustbench_ft.methods.wise_ft import WiseFT
from robustbench_ft.models import load_clip

TINY = dict(model="rbft-tiny-vit", pretrained="random", suite="synthetic", report=False)
TRAIN = {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "lr": 1e-3, "max_steps": 2}
FAST = {**TRAIN, "steps": 2}


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("rbft-tiny-vit", "random")


def context(run_dirs: dict, clip, method: str, options: dict) -> MethodContext:
    config = RunConfig(method=method, method_options=options, **TINY, **run_dirs)
    return MethodContext(resolve(config), clip, progress=False, log=lambda m: None)


def test_pgd_stays_in_the_pixel_ball_and_raises_the_loss(run_dirs, clip):
    ctx = context(run_dirs, clip, "pgd-at", FAST)
    model, ball = ctx.zeroshot, PixelBall(clip.preprocess_train, clip.device)
    images = ball.normalise(torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    opts = AdversarialOptions(eps=8 / 255, step_size=2 / 255, steps=5)
    adv = pgd(model, ball, images, lambda z: F.cross_entropy(z, labels), opts)
    p, p0 = ball.pixels(adv), ball.pixels(images)
    assert (p - p0).abs().max() <= 8 / 255 + 1e-5 and p.min() >= -1e-5 and p.max() <= 1 + 1e-5
    with torch.no_grad():
        assert F.cross_entropy(model(adv), labels) > F.cross_entropy(model(images), labels)


def test_trades_with_beta_zero_is_clean_finetuning(run_dirs, clip):
    (ft,) = Finetune().run(context(run_dirs, clip, "finetune", TRAIN))
    (tr,) = Trades().run(context(run_dirs, clip, "trades", {**FAST, "beta": 0.0}))
    a, b = ft.classifier.state_dict(), tr.classifier.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    (robust,) = Trades().run(context(run_dirs, clip, "trades", {**FAST, "beta": 1.0}))
    assert not torch.equal(robust.classifier.head.weight, tr.classifier.head.weight)


def test_linear_probe_mode_trains_the_head_alone_and_composes_with_wise_ft(run_dirs, clip):
    options = {**FAST, "mode": "linear-probe"}
    (at,) = PgdAT().run(context(run_dirs, clip, "pgd-at", options))
    zero = context(run_dirs, clip, "pgd-at", options).zeroshot
    assert all(torch.equal(v, zero.visual.state_dict()[k]) for k, v in at.classifier.visual.state_dict().items())
    assert not torch.equal(at.classifier.head.weight, zero.head.weight)
    assert at.endpoint == "finetuned" and at.classifier.info.provenance["training"]["steps"] == 2
    cands = WiseFT().run(context(run_dirs, clip, "wise-ft", {"base": "pgd-at", "base_options": options,
                                                             "alpha": "0:1:0.5"}))
    assert {"wise-ft α=0.50", "wise-ft α chosen on val"} <= {c.name for c in cands}


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="pixel units"):
        AdversarialOptions(eps=4.0)


def test_an_interrupted_trades_run_resumes_to_the_uninterrupted_weights(run_dirs, tmp_path, monkeypatch):
    from robustbench_ft.methods import training
    from robustbench_ft.runner import run

    options = {**FAST, "max_steps": 4, "random_start": True, "inner_loss": "ce"}
    config = RunConfig(method="trades", method_options=options, checkpoint_every=2, **TINY, **run_dirs)
    schedule = training.cosine_lr

    def stop_at_3(step, cfg):
        if step == 3:
            raise KeyboardInterrupt
        return schedule(step, cfg)

    monkeypatch.setattr(training, "cosine_lr", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        run(config, progress=False, log=lambda m: None)
    monkeypatch.setattr(training, "cosine_lr", schedule)
    lines: list[str] = []
    resumed = run(config, progress=False, log=lines.append).records[0]
    assert any("resuming from step 2" in line for line in lines)
    fresh_dirs = {**run_dirs, "cache_dir": str(tmp_path / "fresh"), "results_dir": str(tmp_path / "fresh-results")}
    fresh = run(RunConfig(method="trades", method_options=options, checkpoint_every=0, **TINY, **fresh_dirs),
                progress=False, log=lambda m: None).records[0]
    assert resumed.metrics == fresh.metrics and resumed.training["final_loss"] == fresh.training["final_loss"]
