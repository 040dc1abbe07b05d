"""m²-mix (Oh, So, Byun, Lim, Shin, Jeon, Song; Geodesic Multi-Modal Mixup for Robust Fine-Tuning, NeurIPS 2023).

FLYP's contrastive fine-tuning plus hard negatives mixed on the hypersphere. For a batch of N
L2-normalised image and caption embeddings u_i, v_i and λ ~ Beta(β, β) (one draw per step):

* h_j = slerp(u_j, v_j; λ) = sin(λθ_j)/sin θ_j·u_j + sin((1−λ)θ_j)/sin θ_j·v_j, θ_j = arccos⟨u_j, v_j⟩;
* L¹[i, j] = ⟨u_i, h_j⟩ and L²[i, j] = ⟨v_i, h_j⟩ for j ≠ i, with the diagonals replaced by the
  positive ⟨u_i, v_i⟩, all multiplied by s₂ = 1/τ₂;
* L_m² = CE_rows(L¹, I) + CE_rows(L², I) (a sum, rows only);
* L = L_FLYP + w_e·mmix·L_m², w_e = 1/(epoch+1) with ``schedule`` (epochs counted from 0).

This follows the authors' ``main.py`` (changdaeoh/multimodal-mixup @ f8e05fc: ``sph_inter``, the
``--mmmix`` block, ``clip_loss2``, ``--sep_scale``, ``--schedule``), not the README's open_clip snippet,
whose mix logits are multiplied by 0.01 and averaged rather than summed (inconsistent with main.py).
Defaults: mmix 0.01 (main.py's default, inside ``scripts/m2mix.sh``'s sweep {0.05, 0.01, 0.005,
0.001}), β 0.5 (m2mix.sh's ``beta2``), τ₂ 0.07 (main.py, used with ``--sep_scale`` in the scripts),
the 1/(epoch+1) schedule on (the scripts pass ``--schedule``); everything else is FLYP's recipe
(the m²-mix paper's ImageNet settings were not found).

Departures, all written down: (1) the main term is FLYP's, with the model's learnable
``logit_scale``; main.py uses a fixed 1/τ = 100 (this is m²-mix *on FLYP*, and with mmix = 0 it is
FLYP exactly, loss and gradients). (2) λ comes from the step's own generator (:meth:`Step.generator`,
seeded by run seed and step), not Python's global ``random``: the same λ on every rank, for any
worker count and after a resume. (3) θ is computed from the dot product clamped to [−1+ε, 1−ε]
(main.py has no clamp, and identical u_j = v_j give 0/0 = NaN there). (4) The m² term is computed in
float32 (main.py casts λ to fp16). (5) main.py trains in ``eval()`` mode and drops the last partial
batch; the harness's loop is FLYP's. Under gradient accumulation and DDP the term inherits FLYP's
handling (:class:`CaptionedContrastiveLoss`): it is a function of the whole gathered batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from robustbench_ft.datasets.registry import get_dataset
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.flyp import CaptionedContrastiveLoss, FlypOptions, flyp_classifier
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.training import Batch, Step

SLERP_EPS = 1e-6  # the cosine's distance from ±1: keeps sin θ > 0 (identical vectors give no NaN)


@dataclass(frozen=True)
class M2MixOptions(FlypOptions):
    mmix: float = 0.01        # weight of the m² term (main.py --mmmix; m2mix.sh sweeps 0.05, 0.01, 0.005, 0.001)
    beta: float = 0.5         # λ ~ Beta(beta, beta) (m2mix.sh --beta2 0.5)
    tau2: float = 0.07        # the m² logits' scale is 1/tau2 (main.py --tau2, with --sep_scale)
    schedule: bool = True     # weight the m² term by 1/(epoch+1) (the scripts' --schedule)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mmix < 0 or self.beta <= 0 or self.tau2 <= 0:
            raise ValueError(f"m2-mix: need mmix >= 0, beta > 0 and tau2 > 0; got mmix={self.mmix}, "
                             f"beta={self.beta}, tau2={self.tau2}")
        if self.loss != "contrastive":
            raise ValueError("m2-mix adds hard negatives to FLYP's contrastive loss; --loss ce has none to add to")


def slerp(a: torch.Tensor, b: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Row-wise geodesic mix of unit vectors: λ = 1 gives ``a``, λ = 0 gives ``b``, unit norm in between,
    at geodesic distance (1−λ)θ from ``a``. Defined (no NaN) for identical rows, where it returns them."""
    cos = (a * b).sum(dim=1, keepdim=True).clamp(-1 + SLERP_EPS, 1 - SLERP_EPS)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    return torch.sin(lam * theta) / sin * a + torch.sin((1 - lam) * theta) / sin * b


def m2_loss(image_features: torch.Tensor, text_features: torch.Tensor, lam: float, scale: float) -> torch.Tensor:
    """CE_rows(L¹, I) + CE_rows(L², I) of the module docstring, in float32."""
    u, v = image_features.float(), text_features.float()
    mixed = slerp(u, v, lam)
    positive = (u * v).sum(dim=1)
    eye = torch.eye(len(u), device=u.device, dtype=torch.bool)
    targets = torch.arange(len(u), device=u.device)
    total = u.new_zeros(())
    for anchor in (u, v):
        logits = torch.where(eye, positive.view(-1, 1).expand(-1, len(u)), anchor @ mixed.T)
        total = total + F.cross_entropy(logits * scale, targets)
    return total


def draw_lambda(step: Step, beta: float) -> float:
    """λ ~ Beta(β, β), one draw per step from the step's own generator."""
    seed = int(torch.randint(0, 2**62, (), generator=step.generator()))
    return float(np.random.default_rng(seed).beta(beta, beta))


class GeodesicMixupLoss(CaptionedContrastiveLoss):
    """FLYP's loss plus w_e·mmix·L_m² on the whole gathered batch (see the module docstring)."""

    def __init__(self, tokenizer, classnames: list[str], templates: list[str], opts: M2MixOptions):
        super().__init__(tokenizer, classnames, templates, collisions=opts.collisions, prompts=opts.prompts)
        self.opts = opts

    def prepare(self, step: Step, batch: Batch, texts: torch.Tensor) -> Any:
        return draw_lambda(step, self.opts.beta) if self.opts.mmix > 0 else None

    def batch_loss(self, image_features, text_features, scale, labels, state, step) -> torch.Tensor:
        loss = super().batch_loss(image_features, text_features, scale, labels, state, step)
        if self.opts.mmix == 0:
            return loss  # FLYP exactly
        weight = self.opts.mmix / (step.epoch + 1) if self.opts.schedule else self.opts.mmix
        return loss + weight * m2_loss(image_features, text_features, state, 1.0 / self.opts.tau2)


@register_method("m2-mix", paper="Oh et al., Geodesic Multi-Modal Mixup for Robust Fine-Tuning, NeurIPS 2023")
class M2Mix:
    """FLYP plus geodesic-mixup hard negatives (slerp of each image-caption pair), λ ~ Beta per step."""

    options = M2MixOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: M2MixOptions = ctx.options
        ref = get_dataset(ctx.suite.reference)
        return ctx.trained_endpoint(lambda: flyp_classifier(
            ctx, opts, GeodesicMixupLoss(ctx.clip.tokenizer, list(ref.classnames), list(ref.templates), opts),
            method="m2-mix", provenance={"m2_mix": {"mmix": opts.mmix, "beta": opts.beta, "tau2": opts.tau2,
                                                    "schedule": opts.schedule}}))
