"""WiSE-FT (Wortsman et al., CVPR 2022): weight-space ensembles of zero-shot and fine-tuned weights.

θ_α = (1−α)·θ_zs + α·θ_ft over every tensor of the classifier (image encoder and head). α = 0 is
the zero-shot model, α = 1 the fine-tuned one; the paper recommends α = 0.5 when nothing else is known.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from robustbench_ft.methods.base import Candidate, MethodContext, parse_alphas
from robustbench_ft.methods.registry import register_method
from robustbench_ft.models.classifier import Classifier, interpolate


@dataclass(frozen=True)
class WiseFTOptions:
    alpha: Annotated[tuple[float, ...], parse_alphas] = (0.5,)
    base: str = "finetune"            # registered method producing the fine-tuned endpoint
    finetuned: str | None = None      # a saved classifier to use as the endpoint instead of training one
    base_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", parse_alphas(self.alpha))


@register_method("wise-ft", paper="Wortsman et al., Robust fine-tuning of zero-shot models, CVPR 2022")
class WiseFT:
    """Weight-space ensembling of the zero-shot and a fine-tuned classifier, one candidate per α."""

    options = WiseFTOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: WiseFTOptions = ctx.options
        zeroshot = ctx.zeroshot
        if opts.finetuned:
            finetuned = Classifier.load(Path(opts.finetuned), device=ctx.clip.device)
            if finetuned.info.classnames != zeroshot.info.classnames:
                raise ValueError(f"--finetuned {opts.finetuned}: its classes differ from the suite's reference "
                                 f"classes ({finetuned.info.classnames[:3]}... vs {zeroshot.info.classnames[:3]}...)")
            base_name = f"file:{Path(opts.finetuned).name}"
        else:
            base_options = {**ctx.suite.method_defaults.get(opts.base, {}), **opts.base_options}
            endpoints = [c for c in ctx.run_method(opts.base, base_options) if c.tags.get("endpoint") == "finetuned"]
            if len(endpoints) != 1:
                raise ValueError(f"--base {opts.base}: expected one fine-tuned endpoint, the method gave {len(endpoints)}")
            finetuned, base_name = endpoints[0].classifier, opts.base
        curve = f"wise-ft/{base_name}"
        out = [Candidate("zeroshot", zeroshot, {"endpoint": "zeroshot", "alpha": 0.0, "curve": curve}),
               Candidate(f"{base_name}" if not opts.finetuned else "finetuned", finetuned,
                         {"endpoint": "finetuned", "alpha": 1.0, "curve": curve, "base": base_name})]
        for alpha in opts.alpha:
            if 0.0 < alpha < 1.0:
                out.append(Candidate(f"wise-ft α={alpha:.2f}", interpolate(zeroshot, finetuned, alpha),
                                     {"alpha": alpha, "curve": curve, "base": base_name}))
        return out
