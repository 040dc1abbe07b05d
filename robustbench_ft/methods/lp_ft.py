"""LP-FT (Kumar et al., Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution, ICLR 2022).

First a linear probe on the frozen encoder, then end-to-end fine-tuning starting from that head.
With a good head from the start, the early gradients do not have to repair a random or mismatched
head through the encoder, and the pretrained features are distorted less (the paper's argument).
The probe stage is the ``linear-probe`` method (same options, same cache); the fine-tuning stage is
``finetune``'s loop and recipe (WiSE-FT's ImageNet settings) with a smaller default learning rate,
1e-5 instead of 3e-5: the head starts fitted, and Kumar et al. tune LP-FT's fine-tuning learning rate
separately, lower than plain fine-tuning's. Suites and users set it with ``--lr``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.finetune import FinetuneOptions, finetune_classifier
from robustbench_ft.methods.linear_probe import LinearProbeOptions
from robustbench_ft.methods.registry import register_method


@dataclass(frozen=True)
class LPFTOptions(FinetuneOptions, LinearProbeOptions):
    """The fine-tuning stage's options (``finetune``'s) and the probe stage's (``linear-probe``'s)."""

    lr: float = 1e-5

    def __post_init__(self) -> None:
        FinetuneOptions.__post_init__(self)
        LinearProbeOptions.__post_init__(self)

    def probe_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LinearProbeOptions)}


@register_method("lp-ft", paper="Kumar et al., Fine-Tuning can Distort Pretrained Features and Underperform "
                 "Out-of-Distribution, ICLR 2022",
                 defaults="linear-probe's (CLIP paper App. A.3), then finetune's recipe with lr 1e-5 (the probed head "
                          "needs a smaller rate; Kumar et al. tune it separately)")
class LPFT:
    """Linear probe, then end-to-end fine-tuning from the probe's head."""

    options = LPFTOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: LPFTOptions = ctx.options
        probe = ctx.finetuned_endpoint("linear-probe", opts.probe_options())
        return ctx.trained_endpoint(lambda: finetune_classifier(ctx, probe, opts, "lp-ft fine-tuning"))
