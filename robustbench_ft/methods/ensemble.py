"""Output-space ensembles of the zero-shot and a fine-tuned classifier (Wortsman et al. 2022, Sec. 2).

logits_α = (1−α)·logits_zs + α·logits_ft. WiSE-FT's paper compares its weight-space ensemble with
this one: they coincide when the encoder is frozen (a linear probe), and otherwise the output-space
ensemble costs two forward passes per image. The fine-tuned endpoint comes from the same options as
WiSE-FT (``--base``, ``--finetuned``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from robustbench_ft.methods.context import Candidate, MethodContext, alpha_label
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.wise_ft import WiseFTOptions, endpoint_candidates
from robustbench_ft.models.classifier import Classifier


class _LogitPair(torch.nn.Module):
    """Both classifiers' logits side by side, [zs | ft]; one encoder pass when they share the encoder."""

    def __init__(self, zeroshot: Classifier, finetuned: Classifier):
        super().__init__()
        self.zeroshot = zeroshot
        self.finetuned = finetuned

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.zeroshot.features(images)
        ft_feats = feats if self.finetuned.visual is self.zeroshot.visual else self.finetuned.features(images)
        return torch.cat([self.zeroshot.head(feats), self.finetuned.head(ft_feats)], dim=-1)


class OutputEnsemble(Classifier):
    """A Classifier whose "encoder" is the pair of models and whose head mixes their logits with α.

    Being a Classifier, every α of one sweep built on the same pair shares its forward pass in
    :func:`robustbench_ft.evaluation.evaluate` (candidates are grouped by encoder): an α sweep costs
    one pass of each model, as for WiSE-FT over a linear probe.
    """

    def __init__(self, pair: _LogitPair, alpha: float):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        eye = torch.eye(pair.zeroshot.num_classes)
        info = copy.deepcopy(pair.zeroshot.info)
        info.provenance.update({"ensemble_alpha": alpha, "finetuned": pair.finetuned.info.provenance})
        super().__init__(pair, torch.cat([(1.0 - alpha) * eye, alpha * eye], dim=1), info)
        self.to(pair.zeroshot.head.weight.device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)  # the two logit vectors: not normalised, unlike image features


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
        pair = _LogitPair(ctx.zeroshot, finetuned)
        for alpha in opts.alpha:
            if 0.0 < alpha < 1.0:
                out.append(Candidate(f"ensemble α={alpha_label(alpha)}", OutputEnsemble(pair, alpha),
                                     alpha=alpha, curve=f"ensemble/{base_name}", base=base_name))
        return out
