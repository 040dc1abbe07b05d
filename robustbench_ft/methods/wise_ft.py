"""WiSE-FT (Wortsman et al., CVPR 2022): weight-space ensembles of zero-shot and fine-tuned weights.

θ_α = (1−α)·θ_zs + α·θ_ft over every tensor of the classifier (image encoder and head). α = 0 is
the zero-shot model, α = 1 the fine-tuned one; the paper recommends α = 0.5 when nothing else is known.
The fine-tuned endpoint comes from any registered method (``--base ft|lp|lp-ft|flyp|l2-sp|soup``, or a
plugin) or from a checkpoint (``--finetuned PATH``: a classifier saved here, or an open_clip, model-soups or
WiSE-FT checkpoint; see :mod:`robustbench_ft.models.checkpoints`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from robustbench_ft.methods.alpha_curve import CurveOptions, curve_candidates
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.registry import register_method
from robustbench_ft.models.checkpoints import import_checkpoint
from robustbench_ft.models.classifier import Classifier, interpolate
from robustbench_ft.models.hub import is_hub


@dataclass(frozen=True)
class WiseFTOptions(CurveOptions):
    """The α values and their choice (see :mod:`~robustbench_ft.methods.alpha_curve`), and the fine-tuned endpoint."""


def finetuned_endpoint(ctx: MethodContext, opts: CurveOptions) -> tuple[Classifier, str]:
    """The fine-tuned endpoint and its name: loaded from ``opts.finetuned``, or produced by ``opts.base``.

    The base method runs as any top-level run of it would (the suite's defaults for it, overridden by
    ``opts.base_options``: see :mod:`robustbench_ft.methods.resolve`); it must yield exactly one
    candidate with ``endpoint="finetuned"``.
    """
    if opts.finetuned:
        ref = ctx.zeroshot.info
        finetuned = import_checkpoint(opts.finetuned, ctx.config.model, ref.classnames, ref.templates,
                                      trust_pickle=ctx.config.trust_pickle, device=ctx.clip.device)
        if finetuned.info.classnames != ctx.zeroshot.info.classnames:
            raise ValueError(f"--finetuned {opts.finetuned}: its classes differ from the suite's reference classes "
                             f"({finetuned.info.classnames[:3]}... vs {ctx.zeroshot.info.classnames[:3]}...)")
        return finetuned, opts.finetuned if is_hub(opts.finetuned) else f"file:{Path(opts.finetuned).name}"
    return ctx.finetuned_endpoint(opts.base, opts.base_options), opts.base


@register_method("wise-ft", paper="Wortsman et al., Robust fine-tuning of zero-shot models, CVPR 2022",
                 defaults="α = 0.5 (the paper's recommendation without domain knowledge); α also chosen on the val "
                          "split over 0:1:0.1")
class WiseFT:
    """Weight-space ensembling of the zero-shot and a fine-tuned classifier, one candidate per α."""

    options = WiseFTOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: WiseFTOptions = ctx.options
        finetuned, base = finetuned_endpoint(ctx, opts)
        return curve_candidates(ctx, opts, "wise-ft", ctx.zeroshot, finetuned, base,
                                lambda alpha: interpolate(ctx.zeroshot, finetuned, alpha))
