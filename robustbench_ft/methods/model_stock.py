"""Model Stock (Jang, Yun & Han, Model Stock: All we need is just a few fine-tuned models, ECCV 2024,
arXiv 2403.19522).

k fine-tuned runs from the same pre-trained weights w₀ (here: one per seed, each produced by
``--base`` and cached like any fine-tuned endpoint) are merged per parameter tensor, towards w₀ by the
angle between their task vectors:

    cos θ = ⟨w₁ − w₀, w₂ − w₀⟩ / (‖w₁ − w₀‖·‖w₂ − w₀‖),   t = k·cos θ / ((k−1)·cos θ + 1),
    w_H = t·w_avg + (1 − t)·w₀,   w_avg = (w₁ + … + w_k)/k.

Source [secondary]: the official repository (naver-ai/model-stock @ e4d75af) holds only a README;
the formula is the one of its later tutorial notebook (``notebooks/model_stock_example.ipynb``: the
functions ``compute_angle``, ``compute_ratio`` and the merge), read from a third-party copy
(jukumio/Robust_FT @ add356e2, ``model-stock/``), since the official snapshot has no code. That
notebook merges every tensor of the image tower and the classification head (text-side tensors are
not in its classifiers), which is what a :class:`Classifier` holds; so does this module.

For k > 2 the paper's rule was not found; mergekit's implementation (arcee-ai/mergekit @ 0853a11,
``merge_methods/model_stock.py``, linked from the official README; its comment says the paper does not
say) uses the mean of the pairwise cosines in the same t formula, and so does this module (an
assumption). The paper's "periodic merging" during training is not implemented (not found; the
official notebook is likewise "the simplified run of Model Stock without periodic merging").

Departures: the notebook adds 1e-8 to the cosine's and the ratio's denominators; here a tensor whose
task vectors are all zero gets t = 1 (w_avg is then w₀ anyway), one that has a zero task vector among
non-zero ones gets cos = 0 (what the notebook's 1e-8 gives), and nothing else is perturbed, so the
merge of identical runs is that run exactly. The cosine is computed in float64.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.registry import METHOD_ALIASES, register_method
from robustbench_ft.models.classifier import Classifier, check_state_dict
from robustbench_ft.typed import check_fields


@dataclass(frozen=True)
class ModelStockOptions:
    ingredient_seeds: tuple[int, ...] = (0, 1)  # one fine-tuned run per seed (the paper's main setting uses two)
    base: str = "finetune"           # method that trains each run (ft, lp-ft, flyp, ...)
    base_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "base", METHOD_ALIASES.get(self.base, self.base))
        if len(self.ingredient_seeds) < 2:
            raise ValueError(f"model-stock merges at least two fine-tuned runs; got {len(self.ingredient_seeds)} "
                             f"seed(s) {list(self.ingredient_seeds)}: pass --ingredient-seeds 0,1")


def task_cosine(vectors: Sequence[torch.Tensor]) -> float:
    """Mean pairwise cosine between task vectors (float64); 1 when all are zero, 0 for a zero one among others."""
    flat = [v.detach().reshape(-1).double() for v in vectors]
    cosines = []
    for a, b in itertools.combinations(flat, 2):
        aa, bb = torch.sum(a * a), torch.sum(b * b)
        if aa == 0 and bb == 0:
            cosines.append(1.0)
        elif aa == 0 or bb == 0:
            cosines.append(0.0)
        else:  # sqrt(aa·bb), not sqrt(aa)·sqrt(bb): identical vectors then give exactly 1
            cosines.append(float((torch.sum(a * b) / torch.sqrt(aa * bb)).clamp(-1.0, 1.0)))
    return sum(cosines) / len(cosines)


def stock_ratio(cos: float, k: int) -> float:
    """t = k·cos / ((k−1)·cos + 1)."""
    return k * cos / ((k - 1) * cos + 1)


def model_stock(pretrained: Classifier, runs: Sequence[Classifier]) -> tuple[Classifier, dict[str, float]]:
    """The merge of the module docstring over every floating tensor; returns it and t per tensor."""
    if len(runs) < 2:
        raise ValueError(f"model-stock merges at least two fine-tuned runs, got {len(runs)}")
    base = pretrained.state_dict()
    states = [r.state_dict() for r in runs]
    for i, state in enumerate(states):
        check_state_dict(base, state, f"fine-tuned run {i} of the model stock")
    k, merged, ratios = len(runs), {}, {}
    for key, w0 in base.items():
        if not w0.is_floating_point():
            merged[key] = states[-1][key]
            continue
        average = sum(s[key] for s in states) / k
        t = stock_ratio(task_cosine([s[key] - w0 for s in states]), k)
        ratios[key] = t
        merged[key] = t * average + (1 - t) * w0
    out = copy.deepcopy(runs[0])
    out.load_state_dict(merged)
    return out, ratios


@register_method("model-stock", paper="Jang, Yun & Han, Model Stock: All we need is just a few fine-tuned models, "
                 "ECCV 2024")
class ModelStock:
    """k fine-tuned runs merged per tensor towards the pre-trained weights by the angle between their task vectors."""

    options = ModelStockOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: ModelStockOptions = ctx.options
        runs = [ctx.finetuned_endpoint(opts.base, opts.base_options, seed=seed) for seed in opts.ingredient_seeds]
        merged, ratios = model_stock(ctx.zeroshot, runs)
        values = list(ratios.values())
        summary = {"k": len(runs), "ingredient_seeds": list(opts.ingredient_seeds), "base": opts.base,
                   "t_mean": sum(values) / len(values), "t_min": min(values), "t_max": max(values)}
        ctx.log(f"model stock of {len(runs)} {opts.base} runs (seeds {list(opts.ingredient_seeds)}): t per tensor "
                f"{summary['t_min']:.3f}..{summary['t_max']:.3f} (mean {summary['t_mean']:.3f})")
        merged.info = replace(runs[0].info, provenance={
            "pretrained": ctx.clip.pretrained, "method": "model-stock", "model_stock": {**summary, "t": ratios}})
        return [Candidate("model-stock", merged, alpha=1.0, endpoint="finetuned", base=opts.base,
                          extra={"k": len(runs), "t_mean": round(summary["t_mean"], 6)})]
