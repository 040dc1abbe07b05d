"""Zero-shot CLIP (Radford et al. 2021): the head built from class names and prompt templates."""
from __future__ import annotations

from dataclasses import dataclass

from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.registry import register_method


@dataclass(frozen=True)
class ZeroshotOptions:
    pass


@register_method("zeroshot", paper="Radford et al., Learning Transferable Visual Models From Natural Language "
                 "Supervision, ICML 2021")
class Zeroshot:
    """Zero-shot classifier: image encoder + head of averaged, normalised prompt embeddings."""

    options = ZeroshotOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        return [Candidate("zeroshot", ctx.zeroshot, alpha=0.0, endpoint="zeroshot")]
