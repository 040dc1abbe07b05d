"""WiSE-FT (Wortsman et al., CVPR 2022): weight-space ensembles of zero-shot and fine-tuned weights.

θ_α = (1−α)·θ_zs + α·θ_ft over every tensor of the classifier (image encoder and head). α = 0 is
the zero-shot model, α = 1 the fine-tuned one; the paper recommends α = 0.5 when nothing else is known.
The fine-tuned endpoint comes from any registered method (``--base ft|lp|lp-ft|flyp|l2-sp|soup``, or a
plugin) or from a checkpoint (``--finetuned PATH``: a classifier saved here, or an open_clip, model-soups or
WiSE-FT checkpoint; see :mod:`robustbench_ft.models.checkpoints`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from robustbench_ft.methods.context import Candidate, MethodContext, alpha_label, parse_alphas
from robustbench_ft.methods.registry import METHOD_ALIASES, register_method
from robustbench_ft.models.checkpoints import import_checkpoint
from robustbench_ft.models.classifier import Classifier, interpolate
from robustbench_ft.models.hub import is_hub


@dataclass(frozen=True)
class WiseFTOptions:
    alpha: Annotated[tuple[float, ...], parse_alphas] = (0.5,)
    base: str = "finetune"            # registered method producing the fine-tuned endpoint (ft, lp: short names)
    finetuned: str | None = None      # a checkpoint (file or hf-hub: reference) to use as the endpoint instead of training one
    base_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", parse_alphas(self.alpha))
        object.__setattr__(self, "base", METHOD_ALIASES.get(self.base, self.base))


def finetuned_endpoint(ctx: MethodContext, opts: WiseFTOptions) -> tuple[Classifier, str]:
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


def endpoint_candidates(ctx: MethodContext, opts: WiseFTOptions, curve: str) -> tuple[Classifier, str, list[Candidate]]:
    """(fine-tuned classifier, base name, [zero-shot candidate, fine-tuned candidate]) of an α curve."""
    finetuned, base_name = finetuned_endpoint(ctx, opts)
    curve = f"{curve}/{base_name}"
    return finetuned, base_name, [
        Candidate("zeroshot", ctx.zeroshot, alpha=0.0, curve=curve, endpoint="zeroshot"),
        Candidate(base_name if not opts.finetuned else "finetuned", finetuned, alpha=1.0, curve=curve,
                  endpoint="finetuned", base=base_name),
    ]


@register_method("wise-ft", paper="Wortsman et al., Robust fine-tuning of zero-shot models, CVPR 2022")
class WiseFT:
    """Weight-space ensembling of the zero-shot and a fine-tuned classifier, one candidate per α."""

    options = WiseFTOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: WiseFTOptions = ctx.options
        finetuned, base_name, out = endpoint_candidates(ctx, opts, "wise-ft")
        for alpha in opts.alpha:
            if 0.0 < alpha < 1.0:
                out.append(Candidate(f"wise-ft α={alpha_label(alpha)}", interpolate(ctx.zeroshot, finetuned, alpha),
                                     alpha=alpha, curve=f"wise-ft/{base_name}", base=base_name))
        return out
