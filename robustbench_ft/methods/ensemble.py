"""Output-space ensembles of the zero-shot and a fine-tuned classifier (Wortsman et al. 2022, Sec. 2).

logits_α = (1−α)·logits_zs + α·logits_ft. WiSE-FT's paper compares its weight-space ensemble with
this one: they coincide when the encoder is frozen (a linear probe), and otherwise the output-space
ensemble costs two forward passes per image. The fine-tuned endpoint comes from the same options as
WiSE-FT (``--base``, ``--finetuned``).
"""
from __future__ import annotations

from dataclasses import dataclass

from robustbench_ft.methods.alpha_curve import curve_candidates
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.wise_ft import WiseFTOptions, finetuned_endpoint
from robustbench_ft.models.combined import LogitMixture, MemberLogits


@dataclass(frozen=True)
class EnsembleOptions(WiseFTOptions):
    """WiSE-FT's options: the α values, and where the fine-tuned endpoint comes from."""


@register_method("ensemble", paper="Wortsman et al., Robust fine-tuning of zero-shot models, CVPR 2022 "
                 "(output-space ensemble baseline)", defaults="as wise-ft")
class Ensemble:
    """Output-space ensemble (1−α)·zero-shot logits + α·fine-tuned logits, one candidate per α."""

    options = EnsembleOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: EnsembleOptions = ctx.options
        finetuned, base = finetuned_endpoint(ctx, opts)
        pair = MemberLogits([ctx.zeroshot, finetuned])  # one pass of each encoder for every α
        return curve_candidates(ctx, opts, "ensemble", ctx.zeroshot, finetuned, base,
                                lambda alpha: LogitMixture(pair, [1.0 - alpha, alpha]))
