"""DiGraP, directional gradient projection (Huang, Tian, Maneechotesuwan, Chopra & Kira, Directional Gradient
Projection for Robust Fine-Tuning of Foundation Models, ICLR 2025, arXiv:2502.15895).

The fine-tuning loss L and the regulariser R = ½‖θ−θ₀‖² are treated as two objectives; where their
gradients g and c = θ−θ₀ conflict (⟨g, c⟩ < 0) the loss gradient is projected towards the normal
plane of c by a per-tensor strength ω ∈ [0, 1] that is learned by hyper-optimisation. No official
release was found; this follows the closest code, ``SPCG`` in the authors' research repository
chengyuehuang511/vlm_robustness ``optimizer/spcg.py`` (commit 91d73a1, branch ``trainable_pcgrad``), as
``/work/shared/METHODS.md`` §4 and ``projection.md`` §4.1 give it. Per tensor, at step t:

1. c = θ_{t−1} − θ₀, dot = ⟨g_t, c⟩, lc_t = dot/(‖c‖² + 1e-8)·c (kept for the next step).
2. ω: 0 at the tensor's first step; then h_t = cos(g_t, lc_{t−1}) and
   ω_t = clamp(ω_{t−1} − μ·Adam(h_t), 0, 1) (β = 0.9, 0.999, ε 1e-8, bias-corrected with the global step).
   At t = 2, lc₁ = 0 (θ₁ = θ₀ ⇒ c = 0), so h = 0 and ω first moves at t = 3, as in the code.
3. If dot < 0: g̃ = g − ω_t·dot/‖c‖²·c, else g̃ = g. Then a plain Adam step on g̃ (no weight decay).

Defaults: μ = 0.5 (``--strength-lr``; ``TPCGrad.mu`` at 91d73a1. The same file had 5e-2 at 597e8e3,
and the run directories of the config at 91d73a1 suggest a sweep over μ ∈ {1e-2, 1e-1, 0.5, 1, 10};
the paper's value was not retrieved), upper clamp κ = 1, ω₀ = 0, Adam betas and eps as torch's, AdamW
decay 0 (the code overwrites its ``weight_decay`` with ω; ``--weight-decay`` adds the harness's
decoupled decay), the harness's learning rate, schedule and gradient clipping (clipping rescales g,
which changes neither the cosine nor the projection's direction). Head anchored (``--project-head``):
its anchor is the zero-shot head.

Departures, written down:

* **1-D tensors.** The code's hyper-gradient is ``Σ F.normalize(g) ⊙ F.normalize(lc)`` with the default
  ``dim=1``: a sum of per-row cosines for matrices, along input channels for conv weights, and an
  ``IndexError`` on 1-D tensors (biases, LayerNorm, embeddings), so the research code runs only on LoRA
  matrices. Here h is the cosine of the flattened tensors, for every tensor (one number in [−1, 1];
  scale does not matter much, Adam normalises h). ``F.normalize``'s 1e-12 floor on each norm is kept.
* The code modifies ``p.grad`` in place; here the projected gradient is local to the step.
* ``exclude_set`` (ignored by the code) is ``--project-head``; the LoRA mode (anchor 0), the per-step
  prints and ``pcgrad.py``'s two-strength variant are not provided. All state (Adam moments, ω, its
  moments, lc_{t−1}) is in ``optimizer.state``, the global step in the param group (bit-exact resume).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from robustbench_ft.methods.anchored import (
    AnchoredAdam,
    AnchoredOptions,
    anchored_factory,
    check_range,
    gather,
    scalar_adam,
    scatter,
)
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.finetune import finetune_classifier
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.training import OptimizerFactory
from robustbench_ft.models.classifier import Classifier

LC_EPS = 1e-8          # in lc's denominator (spcg.py)
NORMALIZE_EPS = 1e-12  # F.normalize's floor on a norm
MAX_STRENGTH = 1.0     # κ, the upper clamp of ω (spcg.py)


@dataclass(frozen=True)
class DiGraPOptions(AnchoredOptions):
    strength_lr: float = 0.5   # μ, the learning rate of ω's Adam (TPCGrad.mu in spcg.py @ 91d73a1)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("digrap", "strength_lr", self.strength_lr, 0.0)


def conflict_coefficient(dot: torch.Tensor, sq: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """The factor of c in g̃ = g + coef·c: −ω·⟨g,c⟩/‖c‖² where ⟨g, c⟩ < 0, else 0 (elementwise over tensors)."""
    safe = torch.where(sq > 0, sq, torch.ones_like(sq))
    return torch.where(dot < 0, -strength * dot / safe, torch.zeros_like(dot))


def deconflict(grad: torch.Tensor, deviation: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """g − ω·⟨g,c⟩/‖c‖²·c where ⟨g, c⟩ < 0, else g (ω = 1: the conflicting part of g removed)."""
    coef = conflict_coefficient(torch.sum(grad * deviation), torch.sum(deviation * deviation), strength)
    return torch.addcmul(grad, deviation, coef)


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1)


class DiGraPAdam(AnchoredAdam):
    """Adam on the directionally projected gradient with a learned strength ω per tensor; hyper: ``strength_lr``."""

    def update_anchored(self, items: list[tuple[torch.Tensor, torch.Tensor]], group: dict) -> None:
        states = [self.state[p] for p, _ in items]
        first = [("omega" not in s) for s in states]  # ω = 0 at a tensor's first step
        devs, dots, sqs, cross, grad_norms, lc_norms = [], [], [], [], [], []
        for (p, anchor), state, new in zip(items, states, first):
            dev = torch.sub(p, anchor)
            devs.append(dev)
            dots.append(torch.dot(flat(p.grad), flat(dev)))
            sqs.append(torch.dot(flat(dev), flat(dev)))
            if not new:  # for cos(g_t, lc_{t−1}), each norm floored as F.normalize does
                cross.append(torch.dot(flat(p.grad), flat(state["prev_lc"])))
                grad_norms.append(torch.linalg.vector_norm(p.grad))
                lc_norms.append(torch.linalg.vector_norm(state["prev_lc"]))
        dot, sq = torch.stack(dots), torch.stack(sqs)
        old = [s for s, new in zip(states, first) if not new]
        if old:
            floor = NORMALIZE_EPS
            h = torch.stack(cross) / (torch.stack(grad_norms).clamp(min=floor) * torch.stack(lc_norms).clamp(min=floor))
            moments = {"omega_m": gather(old, "omega_m"), "omega_v": gather(old, "omega_v")}
            omega = scalar_adam(gather(old, "omega"), h, moments, "omega", group["t"], group["strength_lr"])
            scatter(old, {"omega": omega.clamp(0.0, MAX_STRENGTH), **moments})
        for state, new in zip(states, first):
            if new:
                zero = torch.zeros((), device=dot.device, dtype=dot.dtype)
                state.update(omega=zero, omega_m=zero.clone(), omega_v=zero.clone())
        coef = conflict_coefficient(dot, sq, gather(states, "omega"))
        keep = dot / (sq + LC_EPS)  # lc_t = ⟨g,c⟩/(‖c‖² + 1e-8)·c
        for (p, _), state, dev, c, k in zip(items, states, devs, coef.unbind(), keep.unbind()):
            projected = torch.addcmul(p.grad, dev, c)
            state["prev_lc"] = dev.mul_(k)
            p.sub_(self.adam_step(p, projected, group))


def digrap_optimizer(start: Classifier, opts: DiGraPOptions) -> OptimizerFactory:
    return anchored_factory("digrap", DiGraPAdam, start, opts.project_head, strength_lr=opts.strength_lr)


@register_method("digrap", paper="Huang, Tian, Maneechotesuwan, Chopra & Kira, Directional Gradient Projection for "
                 "Robust Fine-Tuning of Foundation Models, ICLR 2025")
class DiGraP:
    """Adam on a gradient projected away from conflicts with the pull to the pre-trained weights, strength learned."""

    options = DiGraPOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: DiGraPOptions = ctx.options
        return ctx.trained_endpoint(lambda: finetune_classifier(
            ctx, ctx.zeroshot, opts, "digrap fine-tuning", optimizer=digrap_optimizer(ctx.zeroshot, opts)))
