"""The extension points the next methods build on (issue 12): an optimizer factory whose whole state
resumes bit-exactly, a labelled loader of the held-out split only, per-step random draws that do not
depend on workers, ranks or resumes, and candidates that mix probabilities with a dataset's class
mapping applied to each member before its softmax."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import _FixedData, _shards, _stop_at_step, _tiny_batches

from robustbench_ft import RunConfig
from robustbench_ft.datasets.registry import get_dataset
from robustbench_ft.datasets.spec import DatasetSpec
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.evaluation.scoring import logits_for, score_suite
from robustbench_ft.loading import training_batches
from robustbench_ft.loading.training_batches import TrainingBatches
from robustbench_ft.methods.context import MethodContext
from robustbench_ft.methods.resolve import resolve
from robustbench_ft.methods.training import (
    Checkpointing,
    OptimConfig,
    OptimizerFactory,
    cross_entropy,
    mean_loss,
    train,
)
from robustbench_ft.models import load_clip
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.models.combined import ConstantWeights, LogitMixture, MemberLogits, ProbabilityMixture

CPU = torch.device("cpu")
CFG = OptimConfig(lr=1e-2, weight_decay=0.0, warmup_steps=1, grad_clip=0.0, total_steps=6)


class _HeavyBall(torch.optim.Optimizer):
    """SGD with momentum and a step counter, all of it in ``self.state`` (as the projection methods must)."""

    def __init__(self, params, lr: float, momentum: float):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["t"] = state.get("t", 0) + 1
                buf = state.setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                p.add_(buf, alpha=-group["lr"] / state["t"] ** 0.5)


def _heavy_ball(momentum: float = 0.9) -> OptimizerFactory:
    return OptimizerFactory("heavy-ball", lambda named, cfg: _HeavyBall([p for _, p in named], cfg.lr, momentum),
                            (("momentum", momentum),))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def test_a_custom_optimizer_trains_and_resumes_bit_exactly(tmp_path):
    start = _model()
    straight = copy.deepcopy(start)
    train(straight, _FixedData(_tiny_batches()), CFG, mean_loss(cross_entropy()), device=CPU, progress=False,
          optimizer_factory=_heavy_ball())
    adamw = copy.deepcopy(start)
    train(adamw, _FixedData(_tiny_batches()), CFG, mean_loss(cross_entropy()), device=CPU, progress=False)
    assert not torch.equal(straight[0].weight, adamw[0].weight)  # the factory's optimizer is the one that ran

    keep = Checkpointing(tmp_path / "run.training.pt", every=2)
    resumed = copy.deepcopy(start)
    with pytest.raises(RuntimeError, match="stop"):  # killed in step 5, after the state of step 4 was saved
        train(resumed, _FixedData(_tiny_batches()), CFG, _stop_at_step(mean_loss(cross_entropy()), 4), device=CPU,
              progress=False, checkpointing=keep, optimizer_factory=_heavy_ball())
    state = torch.load(keep.path, weights_only=True)
    assert state["step"] == 4 and any("buf" in s for s in state["optimizer"]["state"].values())
    summary = train(resumed, _FixedData(_tiny_batches()), CFG, mean_loss(cross_entropy()), device=CPU,
                    progress=False, checkpointing=keep, optimizer_factory=_heavy_ball())
    assert summary["resumed_from_step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))  # bitwise


def test_a_state_saved_by_another_optimizer_is_refused_naming_the_file(tmp_path):
    keep = Checkpointing(tmp_path / "run.training.pt", every=2)
    with pytest.raises(RuntimeError, match="stop"):
        train(_model(), _FixedData(_tiny_batches()), CFG, _stop_at_step(mean_loss(cross_entropy()), 3), device=CPU,
              progress=False, checkpointing=keep, optimizer_factory=_heavy_ball(0.9))
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    for factory in (_heavy_ball(0.5), OptimizerFactory("adamw", lambda named, cfg: torch.optim.AdamW(
            [p for _, p in named], lr=cfg.lr))):
        with pytest.raises(ValueError, match=r"run\.training\.pt was saved for another schedule"):
            train(model, _FixedData(_tiny_batches()), CFG, mean_loss(cross_entropy()), device=CPU, progress=False,
                  checkpointing=keep, optimizer_factory=factory)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_step_draws_depend_on_seed_and_step_only(tmp_path):
    """Same per-step draws for any worker count, on every rank of a two-rank layout, and after a resume."""
    from torchvision import transforms

    directory = _shards(tmp_path / "train", n=24)
    transform = transforms.Compose([transforms.Resize(8), transforms.ToTensor()])

    def draws(data, checkpointing=None, stop=None) -> list[float]:
        seen: list[float] = []

        def objective(step, batch):
            if stop is not None and step.index == stop:
                raise RuntimeError("stop")
            seen.append(float(torch.rand((), generator=step.generator())))
            loss = step.model(batch.images.flatten(1)).sum() * 0.0
            loss.backward()
            return 0.0

        model = torch.nn.Linear(3 * 8 * 8, 3)
        cfg = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=0, grad_clip=0.0, total_steps=5)
        try:
            train(model, data, cfg, objective, device=CPU, progress=False, checkpointing=checkpointing, seed=7)
        except RuntimeError:
            pass
        return seen

    reference = draws(TrainingBatches(directory, transform, 8, seed=7, workers=0))
    assert len(set(reference)) == 5
    assert draws(TrainingBatches(directory, transform, 8, seed=7, workers=2)) == reference
    assert draws(TrainingBatches(directory, transform, 8, seed=7, rank=1, world_size=2)) == reference
    keep = Checkpointing(tmp_path / "state.pt", every=2)
    first = draws(TrainingBatches(directory, transform, 8, seed=7), keep, stop=3)
    rest = draws(TrainingBatches(directory, transform, 8, seed=7), keep)
    assert first[:2] + rest == reference  # steps 0-1 before the saved state, 2-4 replayed after it


def test_the_labelled_loader_reads_the_held_out_split_and_nothing_else(run_dirs, monkeypatch):
    config = RunConfig(model="rbft-tiny-vit", pretrained="random", suite="synthetic", method="zeroshot", **run_dirs)
    clip = load_clip("rbft-tiny-vit", "random")
    ctx = MethodContext(resolve(config), clip, progress=False, log=lambda m: None)
    opened: list[Path] = []
    real = training_batches.ShardSamples.__init__

    def spy(self, directory, *args, **kwargs):
        opened.append(Path(directory))
        real(self, directory, *args, **kwargs)

    monkeypatch.setattr(training_batches.ShardSamples, "__init__", spy)
    batches = list(ctx.loader("val", batch_size=5))
    assert [len(labels) for _, labels in batches] == [5, 5, 2]  # the 12 val samples, last batch smaller
    assert batches[0][0].shape[1:] == (3, 32, 32)  # the eval transform of the model
    assert opened == [get_dataset("synth").path(Path(run_dirs["data_root"]), "val")]
    shuffled = list(ctx.loader("val", batch_size=12, shuffle_seed=3))[0][1]
    assert sorted(shuffled.tolist()) == sorted(torch.cat([b[1] for b in batches]).tolist())
    assert shuffled.tolist() == list(ctx.loader("val", batch_size=12, shuffle_seed=3))[0][1].tolist()
    with pytest.raises(ValueError, match="reads the suite's 'train' or 'val' split, not 'test'"):
        ctx.loader("test")  # type: ignore[arg-type]
    assert len(opened) == 3


# --------------------------------------------------------------------------------------------
# Combined candidates
# --------------------------------------------------------------------------------------------

def _classifier(seed: int, classes: int = 4, width: int = 6, visual: torch.nn.Module | None = None) -> Classifier:
    gen = torch.Generator().manual_seed(seed)
    visual = visual if visual is not None else torch.nn.Linear(5, width)
    return Classifier(visual, torch.randn(classes, width, generator=gen) * 3, _info(classes))


def _info(classes: int):
    from robustbench_ft.models.classifier import ClassifierInfo

    return ClassifierInfo("none", [f"c{i}" for i in range(classes)], ["{}"])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_probability_mixture_projects_each_member_before_its_softmax():
    torch.manual_seed(0)
    a, b = _classifier(1), _classifier(2)
    members = MemberLogits([a, b])
    mixture = ProbabilityMixture(members, temperatures=(1.0, 2.0), weights=ConstantWeights((0.3, 0.7)))
    images = torch.randn(9, 5)
    with torch.no_grad():
        raw = mixture(images).numpy()
        za, zb = a(images).numpy(), b(images).numpy()
    assert raw.shape == (9, mixture.output_width) == (9, 2 * 4 + 2)
    subset = DatasetSpec("sub", ("x", "y"), ("{}",), class_subset=(1, 3))
    expected = 0.3 * _softmax(za[:, [1, 3]] / 1.0) + 0.7 * _softmax(zb[:, [1, 3]] / 2.0)  # project, then softmax
    np.testing.assert_allclose(np.exp(logits_for(mixture, raw, subset.project_logits)), expected, rtol=1e-5)
    full = 0.3 * _softmax(za) + 0.7 * _softmax(zb / 2.0)  # softmax over every class, then restrict
    assert not np.allclose(np.log(full[:, [1, 3]]), logits_for(mixture, raw, subset.project_logits))
    pooled = DatasetSpec("pool", ("x", "y"), ("{}",), pooling=((0, 2), (1, 3)))
    pooled_expected = (0.3 * _softmax(np.maximum(za[:, [0, 1]], za[:, [2, 3]]))
                       + 0.7 * _softmax(np.maximum(zb[:, [0, 1]], zb[:, [2, 3]]) / 2.0))
    np.testing.assert_allclose(np.exp(logits_for(mixture, raw, pooled.project_logits)), pooled_expected, rtol=1e-5)


def test_a_mixture_with_all_weight_on_one_member_predicts_as_that_member():
    a, b = _classifier(3), _classifier(4)
    images = torch.randn(50, 5, generator=torch.Generator().manual_seed(1))
    for weights, member in (((1.0, 0.0), a), ((0.0, 1.0), b)):
        mixture = ProbabilityMixture(MemberLogits([a, b]), (1.5, 0.5), ConstantWeights(weights))
        with torch.no_grad():
            raw, own = mixture(images).numpy(), member(images).numpy()
        assert (logits_for(mixture, raw, lambda z: z).argmax(1) == own.argmax(1)).all()


def test_members_sharing_an_encoder_run_it_once_and_logit_mixtures_are_linear():
    calls = []
    encoder = torch.nn.Linear(5, 6)
    encoder.register_forward_hook(lambda *args: calls.append(1))
    a, b = _classifier(5, visual=encoder), _classifier(6, visual=encoder)
    mix = LogitMixture(MemberLogits([a, b]), [0.25, 0.75])
    images = torch.randn(4, 5)
    with torch.no_grad():
        out = mix(images)
        assert len(calls) == 1
        torch.testing.assert_close(out, 0.25 * a(images) + 0.75 * b(images))
    with pytest.raises(ValueError, match="one positive temperature per member"):
        ProbabilityMixture(MemberLogits([a, b]), (1.0, 0.0), ConstantWeights((0.5, 0.5)))
    with pytest.raises(ValueError, match="sum to 1"):
        ConstantWeights((0.5, 0.6))


def test_score_suite_scores_a_probability_mixture_through_its_own_outputs(run_dirs):
    """End to end on shards: evaluation stores the mixture's raw columns; scoring projects per member."""
    from robustbench_ft.datasets.build import ensure_dataset

    clip = load_clip("rbft-tiny-vit", "random")
    spec = get_dataset("synth")
    directory = ensure_dataset(spec, Path(run_dirs["data_root"]), "test", log=lambda m: None)
    zs = Classifier.zeroshot(clip, spec.classnames, spec.templates)
    other = copy.deepcopy(zs)
    with torch.no_grad():
        other.head.weight.mul_(-1)
    mixture = ProbabilityMixture(MemberLogits([zs, other]), (1.0, 1.0), ConstantWeights((1.0, 0.0)))
    scores = score_suite({"mix": mixture, "zs": zs}, {"synth": spec}, {"synth": directory}, "synth",
                         clip.preprocess_eval, EvalOptions(batch_size=8, progress=False))
    assert scores.metrics["mix"]["synth"]["top1"] == scores.metrics["zs"]["synth"]["top1"]
