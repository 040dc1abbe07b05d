"""SPD, selective projection decay (Tian, Huang & Kira, Rethinking Weight Decay for Robust Fine-Tuning of
Foundation Models, NeurIPS 2024, arXiv:2411.01713).

Adam without AdamW's decay, plus a decay towards the pre-trained weights that is applied only to the
tensors whose loss reduction is "inconsistent" with their deviation. Written from the authors'
optimizer, GT-RIPL/Selective-Projection-Decay ``adamSPD.py`` (commit b377695, their only release),
as ``/work/shared/METHODS.md`` §3 and ``projection.md`` §3.1 give it. At step t, per tensor θ with
anchor θ₀:

1. θ̃ = θ_{t−1} − d_t, the bias-corrected Adam step (no weight decay in the code).
2. c_t = −⟨g_t, θ_{t−1} − θ₀⟩ over the whole tensor (g_t the gradient the optimizer receives).
3. If c_t < 0: r_t = clamp((‖θ̃−θ₀‖₂ − ‖θ_{t−1}−θ₀‖₂) / (‖θ̃−θ₀‖₂ + ε), 0, 1) and
   θ_t = θ̃ − λ·r_t·(θ̃ − θ₀); otherwise θ_t = θ̃. λ (``--spd-lambda``, the code's ``weight_decay``
   argument) multiplies the projection directly: it is **not** scaled by the learning rate.

At step 1 θ = θ₀, so c = 0 and nothing triggers (step 1 is Adam's). With λ = 1 a triggered step
returns the deviation to its previous length: it can shrink, never grow.

Defaults: betas (0.9, 0.999), eps 1e-8 (the code's), AdamW decay 0 (``--weight-decay`` adds the harness's
decoupled decay on top, which the code does not have), the harness's learning rate, schedule and
gradient clipping (1.0; clipping rescales the gradient, which changes neither c_t's sign nor the
ratio). λ = 1.0: the paper chose λ by cross-validation on ID validation accuracy (ri.k117 page quoting
the paper) and the values for CLIP/ImageNet were not retrieved (projection.md §3.2); 1 is the value
for which a triggered step is exactly a projection back onto the previous radius, and one of the
values a comment in the authors' later research config lists as tried ("0.5 1 1.5 2",
chengyuehuang511/vlm_robustness ``configs/paligemma/imagenet1k_train.yaml`` @ 1f545f4): a choice, not a
published setting. Sweep it with ``--spd-lambda`` (METHODS proposes 0.1, 0.5, 1, 2). The head is
anchored too (``--project-head``, on): the README's full fine-tuning example anchors every trainable
tensor, and the head here starts at the zero-shot text head, a meaningful anchor.

Departures: ε = 1e-8 in the ratio's denominator (the code has none, so a triggered step with θ̃ = θ₀
gives 0/0; METHODS §3(a) recommends it, as the AdamW forks of the code do); the unused ``hyper`` buffer
(one model of memory) is not allocated; the PEFT mode (``pre=None``: anchor 0) and amsgrad are not
exposed; the anchors are the zero-shot classifier's tensors, not copies in the param groups, and all
state is in ``optimizer.state`` (bit-exact resume).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from robustbench_ft.methods.anchored import AnchoredAdam, AnchoredOptions, anchored_factory, check_range
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.finetune import finetune_classifier
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.training import OptimizerFactory
from robustbench_ft.models.classifier import Classifier

RATIO_EPS = 1e-8


@dataclass(frozen=True)
class SPDOptions(AnchoredOptions):
    spd_lambda: float = 1.0   # λ, the strength of the selective projection (not multiplied by lr)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("spd", "spd_lambda", self.spd_lambda, 0.0)


class SPDAdam(AnchoredAdam):
    """Adam + selective projection decay (see the module docstring); hyper: ``spd_lambda``."""

    def update_anchored(self, items: list[tuple[torch.Tensor, torch.Tensor]], group: dict) -> None:
        dots, before, after, moved = [], [], [], []
        for p, anchor in items:
            deviation = torch.sub(p, anchor)
            dots.append(torch.dot(p.grad.reshape(-1), deviation.reshape(-1)))  # −c_t = ⟨g, θ_{t−1} − θ₀⟩
            before.append(torch.linalg.vector_norm(deviation))
            d = self.adam_step(p, p.grad, group)
            p.sub_(d)  # θ̃
            moved.append(deviation.sub_(d))  # θ̃ − θ₀
            after.append(torch.linalg.vector_norm(moved[-1]))
        new_norm = torch.stack(after)
        ratio = torch.clamp((new_norm - torch.stack(before)) / (new_norm + RATIO_EPS), 0.0, 1.0)
        # the decay where c_t < 0, as arithmetic (no host sync); a factor of 0 leaves θ̃ bit for bit
        factor = torch.where(torch.stack(dots) > 0, ratio * -group["spd_lambda"], torch.zeros_like(ratio))
        for (p, _), dev, f in zip(items, moved, factor.unbind()):
            p.addcmul_(dev, f)  # θ̃ − λ·r·(θ̃ − θ₀)


def spd_optimizer(start: Classifier, opts: SPDOptions) -> OptimizerFactory:
    return anchored_factory("spd", SPDAdam, start, opts.project_head, spd_lambda=opts.spd_lambda)


@register_method("spd", paper="Tian, Huang & Kira, Rethinking Weight Decay for Robust Fine-Tuning of Foundation "
                 "Models, NeurIPS 2024 (selective projection decay)")
class SPD:
    """Adam with a decay towards the pre-trained weights on tensors whose update is inconsistent with their deviation."""

    options = SPDOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: SPDOptions = ctx.options
        return ctx.trained_endpoint(lambda: finetune_classifier(
            ctx, ctx.zeroshot, opts, "spd fine-tuning", optimizer=spd_optimizer(ctx.zeroshot, opts)))
