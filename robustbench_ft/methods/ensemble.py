"""Output-space ensembles of the zero-shot and a fine-tuned classifier (Wortsman et al. 2022, Sec. 2).

logits_α = (1−α)·logits_zs + α·logits_ft. WiSE-FT's paper compares its weight-space ensemble with
this one: they coincide when the encoder is frozen (a linear probe), and otherwise the output-space
ensemble costs two forward passes per image. The fine-tuned endpoint comes from the same options as
WiSE-FT (``--base``, ``--finetuned``).
"""
from __future__ import annotations

from dataclasses import dataclass

from robustbench_ft.methods.context import Candidate, MethodContext, alpha_label
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.wise_ft import WiseFTOptions, endpoint_candidates
from robustbench_ft.models.combined import LogitMixture, MemberLogits


@dataclass(frozen=True)
class EnsembleOptions(WiseFTOptions):
    """WiSE-FT's options: the α values, and where the fine-tuned endpoint comes from."""


@register_method("ensemble", paper="Wortsman et al., Robust fine-tuning of zero-shot models, CVPR 2022 "
                 "(output-space ensemble baseline)")
class Ensemble:
    """Output-space ensemble (1−α)·zero-shot logits + α·fine-tuned logits, one candidate per α."""

    options = EnsembleOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: EnsembleOptions = ctx.options
        finetuned, base_name, out = endpoint_candidates(ctx, opts, "ensemble")
        pair = MemberLogits([ctx.zeroshot, finetuned])  # one pass of each encoder for every α
        for alpha in opts.alpha:
            if 0.0 < alpha < 1.0:
                out.append(Candidate(f"ensemble α={alpha_label(alpha)}", LogitMixture(pair, [1.0 - alpha, alpha]),
                                     alpha=alpha, curve=f"ensemble/{base_name}", base=base_name))
        return out
