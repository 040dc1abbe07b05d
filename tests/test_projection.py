"""The projection family (FTP, SPD, DiGraP, TPGM): each invariant of METHODS.md §1-4 (f) on tiny models, kill and
resume, reuse as a base method, and the refusals of bad input."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import FT, SCRIPT, _FixedData, _flags, _metrics, _stop_at_step, _tiny_batches, _trained

from robustbench_ft import RunConfig
from robustbench_ft.cli import main
from robustbench_ft.loading import training_batches
from robustbench_ft.methods.anchored import AnchoredAdam, anchored_factory, row_sum
from robustbench_ft.methods.context import MethodContext
from robustbench_ft.methods.digrap import DiGraPAdam, DiGraPOptions, deconflict
from robustbench_ft.methods.ftp import FTPAdam, FTPOptions
from robustbench_ft.methods.resolve import resolve
from robustbench_ft.methods.spd import SPDAdam, SPDOptions
from robustbench_ft.methods.tpgm import Projection, TPGMOptions, project_post_hoc
from robustbench_ft.methods.training import Checkpointing, OptimConfig, cross_entropy, mean_loss, train
from robustbench_ft.models import load_clip
from robustbench_ft.models.classifier import Classifier, interpolate

CPU = torch.device("cpu")
TINY = dict(model="rbft-tiny-vit", pretrained="random", suite="synthetic", report=False)


def _net(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def _data(n: int = 4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


def _trajectory(model, optimizer, steps: int, on_step=None, data=None) -> None:
    """``steps`` optimizer steps on a cycle of fixed batches; ``on_step(t, before, grads)`` after each."""
    data = data or _data(dtype=next(model.parameters()).dtype)
    for t in range(1, steps + 1):
        x, y = data[(t - 1) % len(data)]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        if on_step is not None:
            on_step(t, before, grads)


def _anchored(cls, model, anchor_all: bool = True, lr: float = 1e-2, **hyper):
    named = list(model.named_parameters())
    anchors = {n: p.detach().clone() for n, p in named} if anchor_all else {}
    return cls(named, anchors, lr=lr, **hyper), anchors


def _same_as_torch(cls, torch_cls, steps: int = 50, weight_decay: float = 0.0, **hyper) -> None:
    ours, reference = _net(), _net()
    optimizer, _ = _anchored(cls, ours, lr=1e-2, weight_decay=weight_decay, **hyper)
    _trajectory(ours, optimizer, steps)
    _trajectory(reference, torch_cls(reference.parameters(), lr=1e-2, weight_decay=weight_decay, foreach=False), steps)
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


# --------------------------------------------------------------------------- FTP


def test_ftp_with_every_tensor_excluded_is_adamw():
    ours, reference = _net(), _net()
    optimizer, _ = _anchored(FTPAdam, ours, anchor_all=False, weight_decay=0.1, kappa=1.0, radius_lr=1e-2)
    _trajectory(ours, optimizer, 50)
    _trajectory(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=False), 50)
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def test_ftp_first_step_is_a_no_op_and_the_radius_bounds_every_row_at_every_step():
    model = _net()
    optimizer, anchors = _anchored(FTPAdam, model, kappa=1.0, radius_lr=1e-2)
    names = [n for n, _ in model.named_parameters()]
    checked = []

    def check(t, before, grads):
        for name, p in zip(names, model.parameters()):
            state, rows = optimizer.state[p], row_sum((p.detach() - anchors[name]).abs())
            gamma, c_norm = state["gamma"], row_sum(state["prev_c"].abs())
            if t == 1:
                assert float(rows.max()) <= 1e-8  # W₁ ≈ W₀
            assert float(rows.max()) <= float(gamma) + 1e-6  # ‖W_t[r] − W₀[r]‖₁ ≤ γ_t
            hit = c_norm >= gamma  # rows whose candidate left the ball lie on its surface
            torch.testing.assert_close(rows[hit], torch.full_like(rows[hit], float(gamma)), rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(rows[~hit], c_norm[~hit], rtol=1e-5, atol=1e-8)  # the others untouched
            assert 1e-8 * (1 - 1e-6) <= float(gamma) <= float((c_norm + 1e-8).max()) * (1 + 1e-6)
        checked.append(t)

    _trajectory(model, optimizer, 30, check)
    assert checked == list(range(1, 31))
    assert any(float(optimizer.state[p]["gamma"]) > 1e-4 for p in model.parameters())  # the radii did grow


def test_ftp_kappa_zero_never_tightens_a_radius():
    model = _net()
    optimizer, _ = _anchored(FTPAdam, model, kappa=0.0, radius_lr=1e-2)
    previous: dict[int, float] = {}

    def check(t, before, grads):
        for p in model.parameters():
            state = optimizer.state[p]
            gamma, top = float(state["gamma"]), float(row_sum(state["prev_c"].abs()).max()) + 1e-8
            if id(p) in previous:
                assert gamma >= min(previous[id(p)], top) * (1 - 1e-6)
                assert float(state["gamma_m"]) <= 0.0  # positive hyper-gradients are zeroed
            previous[id(p)] = gamma

    _trajectory(model, optimizer, 25, check)


def test_ftp_hyper_gradient_is_the_derivative_of_the_loss_along_the_radius():
    model = _net(torch.float64)
    optimizer, anchors = _anchored(FTPAdam, model, kappa=1.0, radius_lr=1e-2)
    data = _data(dtype=torch.float64)
    _trajectory(model, optimizer, 4, data=data)
    x, y = data[0]
    weight = model[0].weight
    state = optimizer.state[weight]
    m_before, c_prev, scale = state["gamma_m"].clone(), state["prev_c"], state["prev_scale"]
    gamma = state["gamma"]
    assert float((gamma * scale).max()) < 1  # no row clipped: the derivative is h itself

    def loss_at(g: float) -> float:
        with torch.no_grad():
            saved = weight.detach().clone()
            weight.copy_(anchors["0.weight"] + g * scale * c_prev)
            value = torch.nn.functional.cross_entropy(model(x), y).item()
            weight.copy_(saved)
        return value

    eps = 1e-6 * float(gamma)
    finite = (loss_at(float(gamma) + eps) - loss_at(float(gamma) - eps)) / (2 * eps)
    _trajectory(model, optimizer, 1, data=[(x, y)])  # the step whose hyper-gradient is h
    h = (float(state["gamma_m"]) - 0.9 * float(m_before)) / 0.1
    assert h == pytest.approx(finite, rel=1e-5)


# --------------------------------------------------------------------------- SPD


def test_spd_with_zero_lambda_is_adam():
    _same_as_torch(SPDAdam, torch.optim.Adam, spd_lambda=0.0)


def test_spd_first_step_is_adams_and_lambda_one_never_grows_a_triggered_deviation():
    model, reference = _net(), _net()
    optimizer, anchors = _anchored(SPDAdam, model, spd_lambda=1.0)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=False)
    _trajectory(reference, adam, 1)
    names = [n for n, _ in model.named_parameters()]
    triggered = []

    def check(t, before, grads):
        if t == 1:
            for a, b in zip(model.parameters(), reference.parameters()):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
        for name, p, old, g in zip(names, model.parameters(), before, grads):
            if float(torch.sum(g * (old - anchors[name]))) > 0:  # c_t < 0: the projection ran
                triggered.append(t)
                assert torch.linalg.vector_norm(p - anchors[name]) <= torch.linalg.vector_norm(old - anchors[name]) + 1e-6

    _trajectory(model, optimizer, 60, check)
    assert len(triggered) > 10


def test_spd_never_triggered_is_the_adam_trajectory():
    """A linear loss ⟨a, θ⟩: Adam moves θ against a, so ⟨g, θ − θ₀⟩ < 0 at every step."""
    direction = torch.randn(7, generator=torch.Generator().manual_seed(3))
    runs = []
    for make in (lambda ps: SPDAdam([("w", ps[0])], {"w": ps[0].detach().clone()}, lr=1e-2, spd_lambda=2.0),
                 lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False)):
        w = torch.nn.Parameter(torch.zeros(7))
        optimizer = make([w])
        for _ in range(20):
            optimizer.zero_grad()
            (w * direction).sum().backward()
            optimizer.step()
        runs.append(w.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- DiGraP


def test_digrap_with_zero_strength_lr_is_adam_and_the_strength_stays_in_0_1():
    _same_as_torch(DiGraPAdam, torch.optim.Adam, strength_lr=0.0)
    model = _net()  # biases are 1-D: the flattened cosine works on them (the research code raises there)
    optimizer, _ = _anchored(DiGraPAdam, model, strength_lr=10.0)
    seen = []

    def check(t, before, grads):
        omegas = [float(optimizer.state[p]["omega"]) for p in model.parameters()]
        assert all(0.0 <= w <= 1.0 for w in omegas)
        seen.extend(omegas)
        if t <= 2:  # ω first moves at t = 3 (lc₁ = 0)
            assert omegas == [0.0] * len(omegas)

    _trajectory(model, optimizer, 30, check)
    assert max(seen) > 0.0


def test_digrap_full_strength_removes_the_conflicting_component():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g, c = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
        projected = deconflict(g, c, torch.tensor(1.0))
        if torch.sum(g * c) < 0:
            assert abs(float(torch.sum(projected * c))) < 1e-5
        else:
            assert torch.equal(projected, g)
        assert float(torch.sum(deconflict(g, c, torch.tensor(0.3)) * c)) >= min(0.0, float(torch.sum(g * c)))
    assert torch.equal(deconflict(g, torch.zeros_like(c), torch.tensor(1.0)), g)  # c = 0: nothing to project


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("name", ["ftp", "spd", "digrap"])
def test_projection_optimizers_resume_bit_exactly_and_refuse_another_optimizers_state(tmp_path, name):
    classes = {"ftp": (FTPAdam, dict(kappa=0.5, radius_lr=1e-2)), "spd": (SPDAdam, dict(spd_lambda=1.0)),
               "digrap": (DiGraPAdam, dict(strength_lr=1.0))}
    start = _net()
    cfg = OptimConfig(lr=1e-2, weight_decay=0.0, warmup_steps=1, grad_clip=0.0, total_steps=7)
    factory = anchored_factory(name, classes[name][0], start, True, **classes[name][1])

    def fit(model, keep=None, stop=None, optimizer=factory):
        objective = mean_loss(cross_entropy()) if stop is None else _stop_at_step(mean_loss(cross_entropy()), stop)
        return train(model, _FixedData(_tiny_batches()), cfg, objective, device=CPU, progress=False,
                     checkpointing=keep, optimizer_factory=optimizer)

    straight, resumed = copy.deepcopy(start), copy.deepcopy(start)
    fit(straight)
    keep = Checkpointing(tmp_path / "run.training.pt", every=2)
    with pytest.raises(RuntimeError, match="stop"):
        fit(resumed, keep, stop=5)
    saved = torch.load(keep.path, weights_only=True)["optimizer"]
    assert saved["param_groups"][0]["t"] == 4 and len(saved["state"]) == 4  # the anchors are not in it
    assert fit(resumed, keep)["resumed_from_step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))

    other_name = "ftp" if name != "ftp" else "spd"
    other = anchored_factory(other_name, classes[other_name][0], start, True, **classes[other_name][1])
    keep = Checkpointing(tmp_path / "other.training.pt", every=2)
    with pytest.raises(RuntimeError, match="stop"):
        fit(copy.deepcopy(start), keep, stop=3)
    model = copy.deepcopy(start)
    with pytest.raises(ValueError, match=rf"other\.training\.pt was saved for another schedule: by optimizer "
                                         rf".*'{name}'.*this run uses .*'{other_name}'"):
        fit(model, keep, optimizer=other)
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), model.parameters()))  # nothing loaded


@pytest.mark.slow
def test_ftp_run_killed_mid_training_resumes_to_the_uninterrupted_result(run_dirs, tmp_path, capsys):
    """SIGKILL in step 7 of 10 (state saved at step 4), as an OOM killer would; the rerun continues from the
    saved radii, moments and displacements and ends bit for bit where an uninterrupted run ends."""
    options = {**FT, "checkpoint_every": 4, "kappa": 0.5}
    env = {**os.environ, "RBFT_TEST_KILL_AT_STEP": "7"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *_flags(run_dirs, options, "ftp")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert main(_flags(run_dirs, options, "ftp")) == 0
    assert "resuming from step 4 (epoch 0, batch 4)" in capsys.readouterr().out
    fresh = {**run_dirs, "cache_dir": str(tmp_path / "fresh"), "results_dir": str(tmp_path / "fresh-results")}
    assert main(_flags(fresh, {**options, "checkpoint_every": 0}, "ftp")) == 0
    a, b = _trained(run_dirs["cache_dir"], "ftp"), _trained(fresh["cache_dir"], "ftp")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(run_dirs["results_dir"]) == _metrics(fresh["results_dir"])


# --------------------------------------------------------------------------- TPGM


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("rbft-tiny-vit", "random")


def _ctx(run_dirs, clip, method="tpgm", options=None, suite="synthetic"):
    config = RunConfig(method=method, method_options=options or {}, **{**TINY, "suite": suite}, **run_dirs)
    return MethodContext(resolve(config), clip, progress=False, log=lambda m: None)


def _moved(zeroshot: Classifier, scale: float = 0.05) -> Classifier:
    out = copy.deepcopy(zeroshot)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


def test_tpgm_with_no_iterations_is_wise_ft_at_one_half(run_dirs, clip):
    ctx = _ctx(run_dirs, clip, options={"iterations": 0})
    finetuned = _moved(ctx.zeroshot)
    projected = project_post_hoc(ctx, finetuned, ctx.options).state_dict()
    for key, value in interpolate(ctx.zeroshot, finetuned, 0.5).state_dict().items():
        torch.testing.assert_close(projected[key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm_mode", ["l2", "mars"])
def test_tpgm_stays_on_the_segment_and_reads_only_the_val_split(run_dirs, clip, monkeypatch, norm_mode):
    ctx = _ctx(run_dirs, clip, options={"iterations": 6, "val_batch_size": 5, "radius_lr": 0.05, "norm_mode": norm_mode})
    finetuned = _moved(ctx.zeroshot)
    opened: list[Path] = []
    real = training_batches.ShardSamples.__init__
    monkeypatch.setattr(training_batches.ShardSamples, "__init__",
                        lambda self, d, *a, **k: opened.append(Path(d)) or real(self, d, *a, **k))
    projected = project_post_hoc(ctx, finetuned, ctx.options)
    assert opened and set(opened) == {ctx.split_dir("val")}  # 6 batches of 5 from the 12 val images: 3 passes
    zs = {n: p.detach() for n, p in ctx.zeroshot.named_parameters()}
    ft = {n: p.detach() for n, p in finetuned.named_parameters()}
    alphas = []
    for name, p in projected.named_parameters():
        delta, moved = ft[name] - zs[name], p.detach() - zs[name]
        dims = tuple(range(1, delta.dim())) if norm_mode == "mars" and delta.dim() > 1 else tuple(range(delta.dim()))
        alpha = (moved * delta).sum(dim=dims, keepdim=True) / (delta * delta).sum(dim=dims, keepdim=True)
        assert float(alpha.min()) >= -1e-6 and float(alpha.max()) <= 1 + 1e-6
        torch.testing.assert_close(moved, alpha * delta, rtol=0, atol=1e-6)  # θ − θ₀ = α·Δ
        alphas.append(alpha.flatten())
    alphas = torch.cat(alphas)
    assert not torch.allclose(alphas, torch.full_like(alphas, 0.5), atol=1e-4)  # the radii were trained
    assert projected.info.provenance["tpgm"]["projected_tensors"] == len(zs)


def test_tpgm_radius_gradient_is_the_directional_derivative(clip):
    torch.manual_seed(0)
    zeroshot = Classifier.zeroshot(clip, ["red", "green", "blue"], ["a {}."]).double().eval()
    finetuned = _moved(zeroshot, 0.02).eval()
    anchors = {n: p.detach() for n, p in zeroshot.named_parameters()}
    images, labels = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    projection = Projection.between(anchors, dict(finetuned.named_parameters()), "l2")
    radii = projection.clamp({n: g * 0.8 for n, g in projection.initial_radii().items()})
    _, grads = projection.radius_grads(finetuned, radii, images, labels)
    params = {n: v.detach().requires_grad_(True) for n, v in projection.params(radii).items()}
    loss = torch.nn.functional.cross_entropy(torch.func.functional_call(finetuned, params, (images,)), labels)
    theta_grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for name in ("head.weight", "visual.conv1.weight", "visual.ln_post.bias"):
        norm = projection.norms[name]
        assert float(grads[name]) == pytest.approx(float((theta_grads[name] * projection.deltas[name]).sum()
                                                         / (norm + 1e-8)), rel=1e-6)
        eps = 1e-6 * float(radii[name])
        loss_at = lambda g: projection.loss(finetuned, {**radii, name: radii[name] + g}, images, labels).item()
        assert float(grads[name]) == pytest.approx((loss_at(eps) - loss_at(-eps)) / (2 * eps), rel=1e-4)


# --------------------------------------------------------------------------- from the command line

TRAIN = ["--epochs", "1", "--batch-size", "8", "--warmup-steps", "1", "--lr", "1e-3", "--max-steps", "2"]
CASES = {
    "wise-ft-ftp": (["--method", "wise-ft", "--base", "ftp", *TRAIN], ["zeroshot", "ftp", "wise-ft α=0.50", "wise-ft α chosen on val"]),
    "wise-ft-digrap": (["--method", "wise-ft", "--base", "digrap", *TRAIN], ["zeroshot", "digrap", "wise-ft α=0.50", "wise-ft α chosen on val"]),
    "soup-spd": (["--method", "soup", "--kind", "uniform", "--ingredient-seeds", "0,1", "--base", "spd", *TRAIN],
                 ["uniform soup"]),
    "tpgm-l2-sp": (["--method", "tpgm", "--base", "l2-sp", "--iterations", "3", "--val-batch-size", "4", *TRAIN],
                   ["tpgm/l2-sp"]),
    # (the recipe of a base's base is the suite's: the synthetic suite's finetune defaults, 6 steps)
    "wise-ft-tpgm-per-step": (["--method", "wise-ft", "--base", "tpgm", "--mode", "per-step", "--val-batch-size", "4"],
                              ["zeroshot", "tpgm", "wise-ft α=0.50", "wise-ft α chosen on val"]),
}


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("projection-cli")
    return dict(data_root=str(root / "data"), cache_dir=str(root / "cache"), results_dir=str(root / "results"),
                reports_dir=str(root / "reports"), workers=0, eval_batch_size=64)


def _argv(dirs: dict, *args: str) -> list[str]:
    argv = ["run", "--model", "rbft-tiny-vit", "--pretrained", "random", "--no-report", "--device", "cpu", *args]
    for key, value in dirs.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


@pytest.mark.parametrize("case", list(CASES))
def test_projection_methods_serve_as_base_methods_from_the_cli(shared_dirs, capsys, case):
    args, candidates = CASES[case]
    assert main(_argv(shared_dirs, "--suite", "synthetic", "--run-name", case, *args)) == 0, capsys.readouterr().err
    records = [json.loads(p.read_text()) for p in (Path(shared_dirs["results_dir"]) / case).glob("*.json")]
    assert sorted(r["candidate"] for r in records) == sorted(candidates)


BAD = {
    "radius-lr": (["--method", "ftp", "--radius-lr", "-0.1"], "ftp: radius_lr must be >= 0, got -0.1"),
    "kappa": (["--method", "ftp", "--kappa", "1.5"], "ftp: kappa must be in [0, 1], got 1.5"),
    "lambda": (["--method", "spd", "--spd-lambda", "-1"], "spd: spd_lambda must be >= 0, got -1"),
    "strength-lr": (["--method", "digrap", "--strength-lr", "-1"], "digrap: strength_lr must be >= 0, got -1"),
    "tpgm-lr": (["--method", "tpgm", "--radius-lr", "-1"], "tpgm: radius_lr must be >= 0, got -1"),
    "no-val": (["--method", "tpgm", "--suite", "synthetic-noval", *TRAIN],
               "method 'tpgm' trains on held-out data, but suite 'synthetic-noval' declares no held-out (val) "
               "split; declare one in the suite (Suite(val=(dataset, split))"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_projection_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, case):
    import test_methods  # noqa: F401  (registers the synthetic-noval suite)

    args, message = BAD[case]
    dirs = dict(data_root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
                results_dir=str(tmp_path / "results"), workers=0)
    suite = [] if "--suite" in args else ["--suite", "synthetic"]
    assert main(_argv(dirs, *suite, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists() and not (tmp_path / "data").exists()


def test_option_defaults_follow_the_authors_code():
    assert (FTPOptions().grad_clip, FTPOptions().weight_decay, FTPOptions().project_head) == (0.0, 0.0, False)
    assert (FTPOptions().kappa, FTPOptions().radius_lr) == (1.0, 1e-2)
    assert (SPDOptions().weight_decay, SPDOptions().project_head, DiGraPOptions().strength_lr) == (0.0, True, 0.5)
    post, per = TPGMOptions(), TPGMOptions(mode="per-step")
    assert (post.steps, post.norm, post.radius_lr, post.val_batch_size, post.project_head) == (200, "l2", 1e-2, 64, True)
    assert (per.steps, per.norm, per.every) == (1, "mars", 1)
    with pytest.raises(ValueError, match="per-step fine-tunes from the zero-shot model"):
        TPGMOptions(mode="per-step", base="flyp")
    assert issubclass(FTPAdam, AnchoredAdam)
