"""L2-SP (Li, Grandvalet & Davoine, Explicit Inductive Bias for Transfer Learning with Convolutional Networks, ICML 2018).

Fine-tuning with the penalty Ω(θ) = α/2·‖θ_S − θ_S⁰‖² added to the loss, where θ_S are the image
encoder's parameters and θ_S⁰ their pretrained (zero-shot) values: the "starting point" as the
reference of the L2 penalty instead of the origin. α = 0.1 is the paper's setting. L2-SP *replaces*
weight decay (a pull towards 0 on top of the pull towards θ⁰ would be another regulariser), so the
decoupled weight decay of ``finetune``'s recipe is 0 here by default; everything else is
``finetune``'s recipe, and with α = 0 and the same weight decay L2-SP is plain fine-tuning.

The head is left out of Ω by default (the paper's S is the set of parameters shared with the
pretrained network). Here the head starts as the zero-shot text head, a meaningful anchor too, so
``--head-penalty β`` adds β/2·‖W_head − W_head⁰‖² (0 = off). Which FLYP's Table 1 used is not in its
code (locuslab/FLYP has no L2-SP at any commit) or any text read for this harness.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.finetune import FinetuneOptions, Penalty, finetune_classifier
from robustbench_ft.methods.registry import register_method
from robustbench_ft.models.classifier import Classifier


@dataclass(frozen=True)
class L2SPOptions(FinetuneOptions):
    sp_alpha: float = 0.1      # α of Ω = α/2·‖θ_encoder − θ_encoder⁰‖² (Li et al. 2018)
    weight_decay: float = 0.0  # Ω replaces weight decay (Li et al. 2018); finetune's recipe has 0.1
    head_penalty: float = 0.0  # β of β/2·‖W_head − W_head⁰‖² towards the zero-shot head (0 = the paper's S only)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sp_alpha < 0 or self.head_penalty < 0:
            raise ValueError(f"l2-sp: sp_alpha and head_penalty must be >= 0, got {self.sp_alpha}, "
                             f"{self.head_penalty}")


def l2_sp_penalty(start: Classifier, alpha: float, head: float = 0.0) -> Penalty:
    """Ω(model) = α/2·Σ‖θ − θ⁰‖² over the image encoder's parameters (plus β/2·‖W − W⁰‖² over the head's
    with ``head`` = β > 0), θ⁰ taken from ``start`` now."""
    weights = {f"visual.{n}": alpha for n, _ in start.visual.named_parameters()}
    if head > 0:
        weights.update({f"head.{n}": head for n, _ in start.head.named_parameters()})
    anchor = {name: p.detach().clone() for name, p in start.named_parameters() if name in weights}

    def penalty(model: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros((), device=next(model.parameters()).device)
        for name, p in model.named_parameters():
            if name not in weights:
                continue
            ref = anchor[name]
            if ref.device != p.device:  # the anchor follows the model to its device once
                ref = anchor[name] = ref.to(p.device)
            total = total + weights[name] * (p - ref).pow(2).sum()
        return 0.5 * total

    return penalty


@register_method("l2-sp", paper="Li, Grandvalet & Davoine, Explicit Inductive Bias for Transfer Learning with "
                 "Convolutional Networks, ICML 2018",
                 defaults="finetune's WiSE-FT recipe with weight decay 0 (L2-SP replaces it); α = 0.1 (the paper)")
class L2SP:
    """Fine-tuning with an L2 penalty towards the pretrained encoder weights (head excluded)."""

    options = L2SPOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: L2SPOptions = ctx.options
        return ctx.trained_endpoint(lambda: finetune_classifier(
            ctx, ctx.zeroshot, opts, "l2-sp fine-tuning",
            penalty=l2_sp_penalty(ctx.zeroshot, opts.sp_alpha, opts.head_penalty)))
