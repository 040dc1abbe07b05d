"""Issue 15's methods, each held to the invariants of its definition: FLYP's ablations (defaults = the
recipe), m²-mix and CaRot (weight 0 = FLYP, bit for bit), function-space regularisation (λ's 0 =
finetune), Model Stock (identical runs = that run) and VRF (ω ≡ 1/0 = the fine-tuned/zero-shot model,
the failure set exactly {ft right ∧ zs wrong}, calibration, data isolation)."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_methods import TRAIN, context

from robustbench_ft.datasets.spec import DatasetSpec
from robustbench_ft.evaluation.scoring import logits_for
from robustbench_ft.methods.carot import Carot, CarotLoss, CarotOptions, StudentTeacher, teacher_momentum
from robustbench_ft.methods.finetune import Finetune
from robustbench_ft.methods.flyp import (
    CaptionedContrastiveLoss,
    Flyp,
    FlypOptions,
    TextHeadCrossEntropy,
    clip_loss,
    contrastive_loss,
    is_text_parameter,
)
from robustbench_ft.methods.fsr import (
    FsrOptions,
    FunctionSpaceRegularisation,
    function_term,
    jensen_shannon,
    simulated_ood,
)
from robustbench_ft.methods.m2_mix import GeodesicMixupLoss, M2Mix, M2MixOptions, draw_lambda, m2_loss, slerp
from robustbench_ft.methods.model_stock import ModelStock, ModelStockOptions, model_stock, stock_ratio
from robustbench_ft.methods.training import Batch, Step
from robustbench_ft.methods.vrf import (
    FailureSetWeights,
    Vrf,
    build_vrf,
    failure_set,
    kth_neighbour_distance,
    mixture_top1,
    neighbour_k,
    search_temperature,
)
from robustbench_ft.models import load_clip
from robustbench_ft.models.classifier import Classifier, ClassifierInfo, state_hash
from robustbench_ft.models.combined import ConstantWeights, MemberLogits, ProbabilityMixture

CPU = torch.device("cpu")
CLASSES, TEMPLATES = ["red", "green", "blue"], ["a photo of {}.", "a {} square."]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("rbft-tiny-vit", "random")


def _batch(n: int = 6, labels=None) -> Batch:
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor(labels) if labels is not None else torch.arange(n) % 3
    return Batch(torch.randn(len(labels), 3, 32, 32, generator=gen), labels, torch.arange(len(labels)) * 7 + 3)


def _grads(objective, clip_model, batch: Batch, accum: int = 1, index: int = 3, wrap=None):
    model = copy.deepcopy(clip_model).train()
    trained = model if wrap is None else wrap(model)
    value = objective(Step(trained, accum, CPU, "fp32", index=index, seed=5, batches_per_epoch=4, total_steps=40),
                      batch)
    return value, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


# --- FLYP and its ablations ------------------------------------------------------------------------

def test_flyp_default_objective_is_the_plain_clip_loss_of_the_batch(clip):
    batch = _batch()
    loss = CaptionedContrastiveLoss(clip.tokenizer, CLASSES, TEMPLATES)
    value, grads = _grads(loss, clip.model, batch)
    model = copy.deepcopy(clip.model).train()
    image, text, scale = model(batch.images, loss.captions(batch.labels, batch.seeds))
    reference = clip_loss(image, text, scale)
    reference.backward()
    assert value == reference.item()
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters() if p.grad is not None)
    assert loss.captions(batch.labels, batch.seeds).tolist() == \
        [loss.tokens[s % 2, c].tolist() for s, c in zip(batch.seeds.tolist(), batch.labels.tolist())]


def test_flyp_collision_variants_reduce_to_the_clip_loss_without_collisions_and_differ_with_them():
    gen = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(4, 8, generator=gen), dim=1) for _ in range(2))
    scale = torch.tensor(10.0)
    distinct = torch.tensor([0, 1, 2, 3])
    for variant in ("ignore", "soft"):
        torch.testing.assert_close(contrastive_loss(img, txt, scale, distinct, variant), clip_loss(img, txt, scale))
    dup = torch.tensor([0, 0, 1, 2])  # rows 0 and 1 collide
    logits = scale * img @ txt.T
    keep = torch.tensor([[True, False, True, True], [False, True, True, True], [True] * 4, [True] * 4])
    by_hand = 0.5 * sum((-(l.diagonal() - l.masked_fill(~keep, -math.inf).logsumexp(1))).mean()
                        for l in (logits, logits.T))
    torch.testing.assert_close(contrastive_loss(img, txt, scale, dup, "ignore"), by_hand)
    soft = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1., 0], [0, 0, 0, 1.]])
    torch.testing.assert_close(contrastive_loss(img, txt, scale, dup, "soft"),
                               0.5 * (F.cross_entropy(logits, soft) + F.cross_entropy(logits.T, soft)))
    assert torch.isfinite(contrastive_loss(img, txt, scale, dup, "supcon"))
    with pytest.raises(ValueError, match="applies to the contrastive loss"):
        FlypOptions(loss="ce", collisions="ignore")


def test_flyp_ce_ablation_is_cross_entropy_over_every_class_with_one_template_per_class_per_step(clip):
    batch = _batch()
    loss = TextHeadCrossEntropy(clip.tokenizer, CLASSES, TEMPLATES)
    step = Step(copy.deepcopy(clip.model), 1, CPU, "fp32", index=2, seed=5)
    prompts = loss.class_prompts(step)
    assert prompts.shape[0] == 3 and torch.equal(prompts, loss.class_prompts(step))  # one draw per step
    value, grads = _grads(loss, clip.model, batch, index=2)
    model = copy.deepcopy(clip.model)
    image, text, scale = model(batch.images, prompts)
    assert value == pytest.approx(F.cross_entropy(scale * image @ text.T, batch.labels).item(), rel=1e-6)
    assert any(is_text_parameter(n) for n in grads)  # the text tower is trained
    accumulated = _grads(loss, clip.model, batch, accum=3, index=2)
    assert accumulated[0] == pytest.approx(value, rel=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(accumulated[1][name], g, rtol=1e-4, atol=1e-5)
    fixed = TextHeadCrossEntropy(clip.tokenizer, CLASSES, TEMPLATES, prompts="fixed")
    assert torch.equal(fixed.class_prompts(step), loss.tokens[0])
    assert torch.equal(CaptionedContrastiveLoss(clip.tokenizer, CLASSES, TEMPLATES, prompts="fixed").captions(
        batch.labels, batch.seeds), loss.tokens[0, batch.labels])


def test_flyp_with_a_frozen_text_tower_trains_the_image_tower_only(run_dirs, clip):
    (cand,) = Flyp().run(context(run_dirs, clip, "flyp", {**TRAIN, "train_text": False, "loss": "ce"}))
    ctx = context(run_dirs, clip, "flyp", TRAIN)
    zs = ctx.zeroshot
    assert not torch.equal(cand.classifier.visual.conv1.weight, zs.visual.conv1.weight)
    # The head is the unchanged text tower's (unit rows) times the trained temperature.
    scale = cand.classifier.info.provenance["logit_scale"]
    torch.testing.assert_close(cand.classifier.head.weight / scale,
                               zs.head.weight / clip.model.logit_scale.exp().item(), rtol=1e-5, atol=1e-6)


# --- m²-mix ----------------------------------------------------------------------------------------

def test_slerp_is_unit_norm_hits_its_ends_and_is_nan_free_on_identical_vectors():
    gen = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(16, 8, generator=gen), dim=1) for _ in range(2))
    theta = torch.acos((a * b).sum(1))
    for lam in (0.0, 0.3, 0.5, 1.0):
        m = slerp(a, b, lam)
        torch.testing.assert_close(m.norm(dim=1), torch.ones(16), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.acos((m * a).sum(1).clamp(-1, 1)), (1 - lam) * theta, rtol=0, atol=2e-3)
    torch.testing.assert_close(slerp(a, b, 1.0), a, atol=1e-5, rtol=0)
    torch.testing.assert_close(slerp(a, b, 0.0), b, atol=1e-5, rtol=0)
    same = slerp(a, a.clone(), 0.37)
    assert torch.isfinite(same).all()
    torch.testing.assert_close(same, a, atol=1e-5, rtol=0)
    u = a.clone().requires_grad_(True)
    loss = m2_loss(u, u, 0.4, 1 / 0.07)  # u_i = v_i: every mix is its pair: finite loss and gradient
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(u.grad).all()


def test_m2_mix_with_weight_zero_is_flyp_bit_for_bit_and_with_weight_adds_the_geodesic_term(clip):
    batch = _batch()
    flyp = _grads(CaptionedContrastiveLoss(clip.tokenizer, CLASSES, TEMPLATES), clip.model, batch)
    zero = _grads(GeodesicMixupLoss(clip.tokenizer, CLASSES, TEMPLATES, M2MixOptions(mmix=0.0)), clip.model, batch)
    assert _same(flyp, zero)
    opts = M2MixOptions(mmix=0.5)
    mixed = _grads(GeodesicMixupLoss(clip.tokenizer, CLASSES, TEMPLATES, opts), clip.model, batch)
    step = Step(clip.model, 1, CPU, "fp32", index=3, seed=5, batches_per_epoch=4)
    lam = draw_lambda(step, opts.beta)
    model = copy.deepcopy(clip.model).train()
    image, text, scale = model(batch.images, CaptionedContrastiveLoss(clip.tokenizer, CLASSES, TEMPLATES).captions(
        batch.labels, batch.seeds))
    expected = clip_loss(image, text, scale) + 0.5 * m2_loss(image, text, lam, 1 / 0.07)  # epoch 0: weight 1
    assert mixed[0] == pytest.approx(expected.item(), rel=1e-6)
    accumulated = _grads(GeodesicMixupLoss(clip.tokenizer, CLASSES, TEMPLATES, opts), clip.model, batch, accum=3)
    for name, g in mixed[1].items():  # the whole batch's term, whatever the micro-batching
        torch.testing.assert_close(accumulated[1][name], g, rtol=1e-4, atol=1e-5)


def test_m2_lambda_is_one_draw_per_step_from_the_run_seed_and_step():
    draws = [draw_lambda(Step(torch.nn.Linear(1, 1), 1, CPU, "fp32", index=i, seed=3), 0.5) for i in range(6)]
    again = [draw_lambda(Step(torch.nn.Linear(2, 2), 4, CPU, "fp32", index=i, seed=3), 0.5) for i in range(6)]
    assert draws == again and len(set(draws)) == 6 and all(0 < d < 1 for d in draws)
    epoch2 = Step(torch.nn.Linear(1, 1), 1, CPU, "fp32", index=9, batches_per_epoch=4)
    assert epoch2.epoch == 2  # the 1/(epoch + 1) schedule's epoch


def test_m2_mix_logits_keep_the_positive_on_the_diagonal():
    gen = torch.Generator().manual_seed(2)
    u, v = (F.normalize(torch.randn(5, 4, generator=gen), dim=1) for _ in range(2))
    lam, s = 0.3, 1 / 0.07
    h = slerp(u, v, lam)
    by_hand = 0.0
    for anchor in (u, v):
        logits = anchor @ h.T
        logits[torch.arange(5), torch.arange(5)] = (u * v).sum(1)
        by_hand = by_hand + F.cross_entropy(logits * s, torch.arange(5))
    torch.testing.assert_close(m2_loss(u, v, lam, s), by_hand)


# --- CaRot -----------------------------------------------------------------------------------------

def test_carot_with_coefficients_zero_is_flyp_bit_for_bit(clip):
    batch = _batch()
    flyp = _grads(CaptionedContrastiveLoss(clip.tokenizer, CLASSES, TEMPLATES), clip.model, batch)
    zero = CarotLoss(clip.tokenizer, CLASSES, TEMPLATES, CarotOptions(orth=0, cross_fnorm=0, distil=0))
    assert _same(flyp, _grads(zero, clip.model, batch))


def test_carot_terms_are_the_codes_frobenius_norms_and_soft_target_distillation(clip):
    batch = _batch()
    opts = CarotOptions(orth=0.2, cross_fnorm=0.05, distil=1.5, ema_every=2)
    value, grads = _grads(CarotLoss(clip.tokenizer, CLASSES, TEMPLATES, opts), clip.model, batch, index=1,
                          wrap=StudentTeacher)
    model = copy.deepcopy(clip.model)
    teacher = copy.deepcopy(clip.model)
    with torch.no_grad():  # the update due after step 0 (m = 0.05), applied before step 1 reads the teacher
        for t, s in zip(teacher.parameters(), model.parameters()):
            t.mul_(0.05).add_(0.95 * s)
    captions = CaptionedContrastiveLoss(clip.tokenizer, CLASSES, TEMPLATES).captions(batch.labels, batch.seeds)
    image, text, scale = model(batch.images, captions)
    with torch.no_grad():
        ti, tt, ts = teacher(batch.images, captions)
    w = model.visual.proj
    expected = (clip_loss(image, text, scale) + 0.05 * torch.linalg.norm(w @ model.text_projection.T)
                + 0.2 * torch.sqrt(((w.T @ w - torch.eye(w.shape[1])) ** 2).sum()))
    student = [scale * image @ text.T, scale * text @ image.T]
    target = [ts * ti @ tt.T, ts * tt @ ti.T]
    expected = expected - 1.5 * sum((F.softmax(t, 1) * F.log_softmax(s, 1)).sum(1) for s, t in
                                    zip(student, target)).mean()
    assert value == pytest.approx(expected.item(), rel=1e-5)
    accumulated = _grads(CarotLoss(clip.tokenizer, CLASSES, TEMPLATES, opts), clip.model, batch, accum=2, index=1,
                         wrap=StudentTeacher)
    for name, g in grads.items():  # the penalties once per step, the distillation over the whole batch
        torch.testing.assert_close(accumulated[1][name], g, rtol=1e-4, atol=1e-5)
    assert [round(teacher_momentum(s, 100, opts), 4) for s in (0, 10, 19, 20, 99)] == [0.05, 0.475, 0.8575, 0.9, 0.9]


def test_carot_resumes_bit_exactly_with_its_teacher_in_the_training_state(clip, tmp_path):
    from test_training import _FixedData, _stop_at_step

    from robustbench_ft.methods.training import Checkpointing, OptimConfig, train

    data = _FixedData([_batch(), _batch(labels=[2, 1, 0, 2, 1, 0])])
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=1, grad_clip=0.0, total_steps=6)
    objective = CarotLoss(clip.tokenizer, CLASSES, TEMPLATES, CarotOptions(ema_every=2))
    straight = StudentTeacher(copy.deepcopy(clip.model))
    train(straight, data, cfg, objective, device=CPU, progress=False)
    keep = Checkpointing(tmp_path / "carot.training.pt", every=2)
    resumed = StudentTeacher(copy.deepcopy(clip.model))
    with pytest.raises(RuntimeError, match="stop"):  # killed in step 5, after the state of step 4 was saved
        train(resumed, data, cfg, _stop_at_step(objective, 4), device=CPU, progress=False, checkpointing=keep)
    assert any(k.startswith("teacher.") for k in torch.load(keep.path, weights_only=True)["model"])
    resumed = StudentTeacher(copy.deepcopy(clip.model))
    assert train(resumed, data, cfg, objective, device=CPU, progress=False, checkpointing=keep)["resumed_from_step"] == 4
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # student and teacher, bit for bit
    assert not torch.equal(a["teacher.visual.proj"], clip.model.visual.proj)  # the teacher moved
    assert not any(p.requires_grad for p in resumed.teacher.parameters())


def test_carot_runs_as_a_method(run_dirs, clip):
    (cand,) = Carot().run(context(run_dirs, clip, "carot", {**TRAIN, "ema_every": 1}))
    assert cand.classifier.info.provenance["carot"] == {"orth": 0.2, "cross_fnorm": 0.05, "distil": 1.5}


@pytest.mark.parametrize("method", ["m2-mix", "carot"])
def test_contrastive_methods_refuse_a_model_without_a_text_tower(run_dirs, clip, method):
    image_only = dataclasses.replace(clip, model=torch.nn.Module())
    image_only.model.visual = clip.model.visual
    ctx = context(run_dirs, clip, method, TRAIN)
    ctx.clip = image_only
    ctx.__dict__["zeroshot"] = context(run_dirs, clip, method, TRAIN).zeroshot
    runner = M2Mix if method == "m2-mix" else Carot
    with pytest.raises(ValueError, match=f"^{method} trains CLIP's text tower .* has no text tower"):
        runner().run(ctx)
    assert not list((Path(run_dirs["cache_dir"]) / "checkpoints").glob(f"{method}-*"))


# --- function-space regularisation -------------------------------------------------------------------

def test_fsr_with_lambdas_zero_is_finetune(run_dirs, clip):
    (ft,) = Finetune().run(context(run_dirs, clip, "finetune", TRAIN))
    (fsr,) = FunctionSpaceRegularisation().run(context(run_dirs, clip, "fsr", {**TRAIN, "lambda_f": 0.0,
                                                                                "lambda_c": 0.0}))
    a, b = ft.classifier.state_dict(), fsr.classifier.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    (full,) = FunctionSpaceRegularisation().run(context(run_dirs, clip, "fsr", TRAIN))
    assert not torch.equal(full.classifier.head.weight, ft.classifier.head.weight)
    assert full.classifier.info.provenance["fsr"]["interpretation"] == "METHODS.md §7"


def test_fsr_function_term_is_zero_at_the_pretrained_weights_and_views_are_per_sample(clip):
    zs = Classifier.zeroshot(clip, CLASSES, TEMPLATES)
    batch = _batch()
    model = copy.deepcopy(zs)
    term = function_term(model, zs, batch, 0.5)
    term.backward()
    assert abs(term.item()) < 1e-6
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-5
    views = simulated_ood(batch.images, batch.seeds, 1, 0.5)
    torch.testing.assert_close(simulated_ood(batch.images[2:4], batch.seeds[2:4], 1, 0.5), views[2:4], rtol=0, atol=0)
    assert not torch.equal(simulated_ood(batch.images, batch.seeds, 2, 0.5), views)
    assert not torch.equal(views, batch.images)
    logits = zs(views)
    assert jensen_shannon(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    assert FsrOptions(ood_strength=0.0) and torch.equal(simulated_ood(batch.images, batch.seeds, 1, 0.0), batch.images)


# --- Model Stock -----------------------------------------------------------------------------------

def test_model_stock_of_two_identical_runs_is_that_run_and_one_run_is_refused(run_dirs, clip):
    (ft,) = Finetune().run(context(run_dirs, clip, "finetune", TRAIN))
    (stock,) = ModelStock().run(context(run_dirs, clip, "model-stock", {"ingredient_seeds": (0, 0), "base_options": TRAIN}))
    a, b = ft.classifier.state_dict(), stock.classifier.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: t = 1 on every tensor
    assert stock.extra == {"k": 2, "t_mean": 1.0}
    with pytest.raises(ValueError, match="at least two fine-tuned runs; got 1 seed"):
        ModelStockOptions(ingredient_seeds=(0,))


def test_model_stock_moves_towards_the_pretrained_weights_by_the_angle():
    def clf(w: list[float]) -> Classifier:
        out = Classifier(torch.nn.Identity(), torch.tensor([w]), ClassifierInfo("none", ["x"], ["{}"]))
        return out

    w0, w1, w2 = clf([0.0, 0.0]), clf([1.0, 0.0]), clf([0.0, 1.0])  # task vectors at 90°: t = 0
    merged, ratios = model_stock(w0, [w1, w2])
    assert ratios["head.weight"] == 0.0 and torch.equal(merged.head.weight, w0.head.weight)
    w3 = clf([1.0, 1.0])  # 45° from w1: cos = 1/√2
    merged, ratios = model_stock(w0, [w1, w3])
    cos = 1 / math.sqrt(2)
    assert ratios["head.weight"] == pytest.approx(2 * cos / (1 + cos))
    torch.testing.assert_close(merged.head.weight, torch.tensor([[1.0, 0.5]]) * ratios["head.weight"])
    assert stock_ratio(1.0, 3) == 1.0 and stock_ratio(0.0, 3) == 0.0


# --- VRF -------------------------------------------------------------------------------------------

def test_the_failure_set_is_exactly_the_samples_only_the_finetuned_model_gets_right():
    feats = torch.arange(10.0).view(5, 2)
    labels = torch.tensor([0, 1, 2, 0, 1])
    ft = F.one_hot(torch.tensor([0, 1, 0, 0, 2]), 3).float()  # right on 0, 1, 3
    zs = F.one_hot(torch.tensor([0, 2, 1, 1, 1]), 3).float()  # right on 0, 4
    assert torch.equal(failure_set(feats, ft, zs, labels), feats[[1, 3]])
    assert neighbour_k(100, 100_000, "code", None) == 1 and neighbour_k(5000, 1000, "paper", None) == 5
    with pytest.raises(ValueError, match=r"k=20 \(from the code rule\) must lie in \[1, \|V\|\]"):
        neighbour_k(2, 100, "code", None)


def test_kth_neighbour_distance_is_squared_exact_in_chunks_and_non_decreasing_in_k():
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 6, generator=gen), dim=1)
    queries = torch.cat([F.normalize(torch.randn(7, 6, generator=gen), dim=1), bank[:1].repeat(1, 1)])
    full = torch.cdist(queries, bank).pow(2).sort(dim=1).values
    previous = torch.zeros(len(queries))
    for k in (1, 2, 5, 17, 50):
        d = kth_neighbour_distance(queries, bank, k, chunk=8)
        torch.testing.assert_close(d, full[:, k - 1], rtol=0, atol=1e-5)
        assert (d >= previous).all() and (d >= 0).all() and (d <= 4 + 1e-5).all()
        previous = d
    twice = torch.cat([bank, bank[:1]])  # the last query equals 2 members: its 2nd distance is 0
    assert kth_neighbour_distance(queries[-1:], twice, 2, chunk=4).item() == pytest.approx(0.0, abs=1e-6)


def test_temperature_search_meets_the_calibration_tolerance():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (400,), generator=gen)
    logits = torch.randn(400, 10, generator=gen) * 4 + 3 * F.one_hot(labels, 10)
    acc = float((logits.argmax(1) == labels).float().mean())
    for scale in (0.1, 1.0, 50.0):  # over-, well- and under-confident starts: the bracket widens as needed
        t, conf, met = search_temperature(logits * scale, acc)
        assert met and abs(conf - acc) <= 1e-3
        assert abs(torch.softmax(logits * scale / t, 1).max(1).values.mean().item() - acc) <= 1e-3 + 1e-9


def _pair(seed: int):
    torch.manual_seed(seed)
    encoder = torch.nn.Linear(5, 6)
    zs = Classifier(torch.nn.Linear(5, 6), torch.randn(4, 6) * 3, ClassifierInfo("none", list("abcd"), ["{}"]))
    ft = Classifier(encoder, torch.randn(4, 6) * 3, ClassifierInfo("none", list("abcd"), ["{}"]))
    return zs, ft


def test_vrf_weight_one_or_zero_gives_the_member_and_a_constant_weight_the_probability_ensemble():
    zs, ft = _pair(0)
    images = torch.randn(40, 5, generator=torch.Generator().manual_seed(3))
    bank = F.normalize(torch.randn(12, 6, generator=torch.Generator().manual_seed(4)), dim=1)
    with torch.no_grad():
        z_zs, z_ft = zs(images).numpy(), ft(images).numpy()
    for a, member in ((1e9, z_ft), (-1e9, z_zs)):  # ω ≡ 1, ω ≡ 0
        vrf = ProbabilityMixture(MemberLogits([zs, ft]), (1.7, 0.6), FailureSetWeights(bank, 3, a, 0.6))
        with torch.no_grad():
            raw = vrf(images).numpy()
        assert (logits_for(vrf, raw, lambda z: z).argmax(1) == member.argmax(1)).all()
    half = ProbabilityMixture(MemberLogits([zs, ft]), (1.0, 1.0), FailureSetWeights(bank, 3, 0.0, 1e9))  # ω ≡ 1/2
    reference = ProbabilityMixture(MemberLogits([zs, ft]), (1.0, 1.0), ConstantWeights((0.5, 0.5)))
    subset = DatasetSpec("sub", ("x", "y"), ("{}",), class_subset=(1, 3))
    with torch.no_grad():
        got, want = (logits_for(m, m(images).numpy(), subset.project_logits) for m in (half, reference))
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-6, atol=1e-8)
    softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    expected = 0.5 * softmax(z_zs[:, [1, 3]]) + 0.5 * softmax(z_ft[:, [1, 3]])  # each member projected first
    np.testing.assert_allclose(np.exp(got), expected, rtol=1e-5)
    labels = torch.randint(0, 4, (40,))
    omega = torch.full((40,), 0.3)
    p = 0.7 * softmax(z_zs) + 0.3 * softmax(z_ft)
    assert mixture_top1(torch.from_numpy(z_zs), torch.from_numpy(z_ft), omega, labels, (1.0, 1.0)) == \
        pytest.approx(float((p.argmax(1) == labels.numpy()).mean()))
    assert state_hash(FailureSetWeights(bank, 3, 1.5, 0.6)) != state_hash(FailureSetWeights(bank[1:], 3, 1.5, 0.6))


def test_vrf_reads_train_and_val_only_and_chooses_on_val(run_dirs, clip, shard_reads):
    (zs, ft, vrf) = Vrf().run(context(run_dirs, clip, "vrf", {"base_options": TRAIN, "k": 1}))
    assert sorted(set(shard_reads)) == ["synth/train", "synth/val"]  # never synth/test, never a shift
    assert (zs.endpoint, ft.endpoint, vrf.name, vrf.base) == ("zeroshot", "finetuned", "vrf", "finetune")
    assert "fallback" not in vrf.extra and vrf.extra["k"] == 1 and vrf.extra["ab_selection"] == "val grid"
    assert (vrf.extra["a"], vrf.extra["b"]) in [(a, b) for a in (1.3, 1.4, 1.5, 1.6, 1.7) for b in (0.4, 0.5, 0.6, 0.8, 1.0)]
    assert isinstance(vrf.classifier, ProbabilityMixture)
    assert vrf.classifier.weights.bank.shape == (vrf.extra["failure_set"], clip.model.visual.output_dim)
    with pytest.raises(ValueError, match=r"must lie in \[1, \|V\|\]"):
        Vrf().run(context(run_dirs, clip, "vrf", {"base_options": TRAIN, "k": 10**6}))


def test_vrf_with_an_empty_failure_set_is_the_finetuned_model_and_says_so(run_dirs, clip):
    ctx = context(run_dirs, clip, "vrf", {"k": 1})
    messages: list[str] = []
    ctx.log = messages.append
    model, extra = build_vrf(ctx, ctx.options, ctx.zeroshot)  # "fine-tuned" = zero-shot: no sample only it gets
    assert model is ctx.zeroshot and extra["failure_set"] == 0 and extra["fallback"].startswith("empty")
    assert any("zero-shot-failure set is empty" in m for m in messages)
