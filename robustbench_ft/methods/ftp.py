"""FTP (Tian, Liu, Smith & Kira, Fast Trainable Projection for Robust Fine-Tuning, NeurIPS 2023, arXiv:2310.19182).

Adam whose every step is followed by a projection of each anchored tensor onto a ball around its
pre-trained value, with a radius γ per tensor that is itself learned by a scalar Adam on a
hyper-gradient, with no extra forward or backward pass. Written from the update rule of the
authors' code, GT-RIPL/FTP ``util/FTP.py`` (``AdamP`` = Adam + FTP) at commit 1f8dd44, as
``/work/shared/METHODS.md`` §1 and its check ``projection.md`` §1 give it. At step t, for a tensor W
with anchor W₀:

1. d_t = the Adam step (``AnchoredAdam.adam_step``; decoupled weight decay folded in, 0 by default
   as in every example of the code); the candidate displacement c_t = W_{t−1} − d_t − W₀.
2. n_t[r] = Σ|c_t[r, …]| + 1e-8, an L1 norm per index r of dim 0 (a 1-D tensor is one row).
3. γ: at the tensor's first step γ₁ = 1e-8 (so that step is discarded: W₁ ≈ W₀, as in the code). Later,
   h_t = Σ_r ⟨g_t[r], c_{t−1}[r]⟩ / n_{t−1}[r] (∂L/∂γ at W_{t−1} = W₀ + γ/n·c, also where the ratio was
   clipped, as the code does), h_t ← κ·h_t if h_t > 0 (annealing), γ_t = γ_{t−1} − μ·Adam(h_t)
   (β = 0.9, 0.999, ε 1e-8, bias-corrected with the *global* step t, so the first γ step, at t = 2, is
   ≈ 0.744·μ: projection.md §6.1), then γ_t ← clamp(γ_t, 1e-8, max_r n_t[r]).
4. W_t[r] = W₀[r] + clamp(γ_t / n_t[r], 0, 1)·c_t[r]; c_t and 1/n_t are kept for the next h.

Defaults from the code: κ = 1 (``"k": 1``, hard-coded in ``main_finetune.py``), μ = 1e-2 (hard-coded),
weight decay 0, the head excluded (the code's exclude set is the random head,
``{'module.head.weight', 'module.head.bias'}``; ``--project-head`` anchors the zero-shot head here),
no gradient clipping (the FTP training loop does not clip; the harness's other methods clip at 1.0,
so ``--grad-clip 1`` gives the comparison under the harness recipe). Learning rate and schedule are
``finetune``'s (the paper's ImageNet recipe was not retrieved; the code's DomainNet recipe is in
``datasets/domainnet.py``).

Departures, all written down:

* All state is in ``optimizer.state`` (γ, its two moments, c_{t−1}, 1/n_{t−1}) and the param group (the
  global step), so kill/resume is bit-exact; the code keeps it in a plain object that no checkpoint saves.
* The anchors are the zero-shot classifier's tensors, never copied into the state (see ``anchored``).
* The code matches its buffers to tensors by call order, so a tensor that skips a step (no gradient)
  shifts every later buffer (its history has the fix of one such bug, fee9b1a); here the state is
  per tensor, and a tensor's first projected step is its first step with a gradient. With every
  tensor having a gradient every step (fine-tuning) the two agree.
* The hyper-gradient uses the gradient as the harness gives it to the optimizer (after clipping,
  when ``--grad-clip`` is on; off by default, as the code).
* ``AdamP``'s amsgrad option and the ``SGDP`` variant are not provided.
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
    row_sum,
    scalar_adam,
    scatter,
)
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.finetune import finetune_classifier
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.training import OptimizerFactory
from robustbench_ft.models.classifier import Classifier

FIRST_RADIUS = 1e-8  # γ₁ and the lower clamp of γ (util/FTP.py)
NORM_EPS = 1e-8      # added to each row's L1 norm (util/FTP.py, the MARS norm)


@dataclass(frozen=True)
class FTPOptions(AnchoredOptions):
    grad_clip: float = 0.0     # the FTP code does not clip gradients
    kappa: float = 1.0         # κ (the code's k): factor on positive hyper-gradients, in [0, 1]; 1 = the code's
    radius_lr: float = 1e-2    # μ, the learning rate of the radii's Adam (hard-coded 1e-2 in util/FTP.py)
    project_head: bool = False  # the code excludes the head (a random one there)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("ftp", "kappa", self.kappa, 0.0, 1.0)
        check_range("ftp", "radius_lr", self.radius_lr, 0.0)


class FTPAdam(AnchoredAdam):
    """Adam + FTP's trainable projection (see the module docstring); hyper: ``kappa``, ``radius_lr``."""

    def update_anchored(self, items: list[tuple[torch.Tensor, torch.Tensor]], group: dict) -> None:
        states = [self.state[p] for p, _ in items]
        first = [("gamma" not in s) for s in states]  # a tensor's first projected step: γ = 1e-8, no clip
        cands, norms, hyper = [], [], []
        for (p, anchor), state, new in zip(items, states, first):
            c = torch.sub(p, self.adam_step(p, p.grad, group)).sub_(anchor)  # c_t = W̃_t − W₀
            cands.append(c)
            norms.append(row_sum(c.abs()).add_(NORM_EPS))
            if not new:  # h_t = Σ_r ⟨g_t[r], c_{t−1}[r]⟩ / n_{t−1}[r]
                hyper.append(torch.mul(p.grad, state["prev_c"]).mul_(state["prev_scale"]).sum())
        old = [s for s, new in zip(states, first) if not new]
        if old:
            h = torch.stack(hyper)
            h = torch.where(h > 0, h * group["kappa"], h)  # annealing, without a host sync
            moments = {"gamma_m": gather(old, "gamma_m"), "gamma_v": gather(old, "gamma_v")}
            gamma = scalar_adam(gather(old, "gamma"), h, moments, "gamma", group["t"], group["radius_lr"])
            tops = torch.stack([n.max() for n, new in zip(norms, first) if not new])
            scatter(old, {"gamma": torch.minimum(gamma.clamp(min=FIRST_RADIUS), tops), **moments})  # hardtanh
        for (p, anchor), state, new, c, n in zip(items, states, first, cands, norms):
            if new:
                zero = torch.zeros((), device=p.device, dtype=p.dtype)
                state.update(gamma=torch.full_like(zero, FIRST_RADIUS), gamma_m=zero, gamma_v=zero.clone())
            p.copy_(anchor).addcmul_(torch.div(state["gamma"], n).clamp_(0.0, 1.0), c)  # W₀ + clamp(γ/n, 0, 1)·c
            state["prev_c"], state["prev_scale"] = c, n.reciprocal_()


def ftp_optimizer(start: Classifier, opts: FTPOptions) -> OptimizerFactory:
    return anchored_factory("ftp", FTPAdam, start, opts.project_head, kappa=opts.kappa, radius_lr=opts.radius_lr)


@register_method("ftp", paper="Tian, Liu, Smith & Kira, Fast Trainable Projection for Robust Fine-Tuning, "
                 "NeurIPS 2023")
class FTP:
    """Adam with a learned per-tensor projection radius around the pre-trained weights (no extra passes)."""

    options = FTPOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: FTPOptions = ctx.options
        return ctx.trained_endpoint(lambda: finetune_classifier(
            ctx, ctx.zeroshot, opts, "ftp fine-tuning", optimizer=ftp_optimizer(ctx.zeroshot, opts)))
