"""L2-SP (Li, Grandvalet & Davoine, Explicit Inductive Bias for Transfer Learning with Convolutional Networks, ICML 2018).

Fine-tuning with the penalty Ω(θ) = α/2·‖θ_S − θ_S⁰‖² added to the loss, where θ_S are the image
encoder's parameters and θ_S⁰ their pretrained (zero-shot) values: the "starting point" as the
reference of the L2 penalty instead of the origin. The head is excluded (the paper's S is the set
of parameters shared with the pretrained network; here the head is the zero-shot text head, whose
anchor would be arbitrary in scale). α = 0.1 is the paper's setting. Everything else is
``finetune``'s recipe, so with α = 0 L2-SP *is* plain fine-tuning; the paper also replaced weight
decay by Ω, which ``--weight-decay 0`` reproduces.
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
    sp_alpha: float = 0.1   # α of Ω = α/2·‖θ_encoder − θ_encoder⁰‖² (Li et al. 2018)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sp_alpha < 0:
            raise ValueError(f"l2-sp: sp_alpha must be >= 0, got {self.sp_alpha}")


def l2_sp_penalty(start: Classifier, alpha: float) -> Penalty:
    """Ω(model) = α/2·Σ‖θ − θ⁰‖² over the image encoder's parameters, θ⁰ taken from ``start`` now."""
    anchor = {name: p.detach().clone() for name, p in start.visual.named_parameters()}

    def penalty(model: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros((), device=next(model.parameters()).device)
        for name, p in model.visual.named_parameters():
            ref = anchor[name]
            if ref.device != p.device:  # the anchor follows the model to its device once
                ref = anchor[name] = ref.to(p.device)
            total = total + (p - ref).pow(2).sum()
        return 0.5 * alpha * total

    return penalty


@register_method("l2-sp", paper="Li, Grandvalet & Davoine, Explicit Inductive Bias for Transfer Learning with "
                 "Convolutional Networks, ICML 2018")
class L2SP:
    """Fine-tuning with an L2 penalty towards the pretrained encoder weights (head excluded)."""

    options = L2SPOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: L2SPOptions = ctx.options
        torch.manual_seed(ctx.config.seed)
        model = ctx.cached_classifier(lambda: finetune_classifier(
            ctx, ctx.zeroshot, opts, "l2-sp fine-tuning", penalty=l2_sp_penalty(ctx.zeroshot, opts.sp_alpha)))
        return [Candidate("l2-sp", model, alpha=1.0, endpoint="finetuned", base="l2-sp")]
