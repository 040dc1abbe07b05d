"""Model soups (Wortsman et al., Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time, ICML 2022).

Several fine-tuned runs from the same start (ingredients: one per seed × hyper-parameter
combination, each produced by ``--base`` and cached like any fine-tuned endpoint) are averaged in
weight space. ``uniform`` averages all of them. ``greedy`` (the paper's Recipe 1) sorts the
ingredients by accuracy on held-out *training* data (the suite's val split) and adds each one, best
first, if the soup's held-out accuracy strictly improves (model-soups' ``main.py`` @ d5398f1:
``if held_out_val_accuracy > best_val_acc_so_far``; a tie leaves the ingredient out). Test and shift
data are never used.

The paper's ImageNet soups used 72 ingredients from a random hyper-parameter search (learning
rate, weight decay, epochs, label smoothing, augmentation) starting from a linear-probe head; here
the ingredients are the grid ``ingredient_seeds × lrs × weight_decays × label_smoothings`` (an empty list keeps
the base's own value) over any base method (``finetune`` by default; ``lp-ft`` for the paper's
probe initialisation).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from robustbench_ft.evaluation.cache import ArrayCache
from robustbench_ft.evaluation.dataset_pass import evaluate_cached
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.registry import METHOD_ALIASES, register_method
from robustbench_ft.models.classifier import Classifier, average
from robustbench_ft.typed import check_fields

KINDS = ("uniform", "greedy")
GRID = {"lrs": "lr", "weight_decays": "weight_decay", "label_smoothings": "label_smoothing"}


@dataclass(frozen=True)
class SoupOptions:
    kind: str = "greedy"                      # "uniform" (average all) or "greedy" (Recipe 1, held-out accuracy)
    ingredient_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # one ingredient per seed (× each hyper-parameter value)
    lrs: tuple[float, ...] = ()               # learning rates to vary (empty: the base's)
    weight_decays: tuple[float, ...] = ()     # weight decays to vary (empty: the base's)
    label_smoothings: tuple[float, ...] = ()  # label smoothings to vary (empty: the base's)
    evaluate_ingredients: bool = False        # also evaluate every ingredient (for the paper's scatter plot)
    base: str = "finetune"                    # method that trains each ingredient
    base_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)  # lists from a config file become tuples; "1,2" from the command line is parsed there
        object.__setattr__(self, "base", METHOD_ALIASES.get(self.base, self.base))
        if self.kind not in KINDS:
            raise ValueError(f"soup: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.ingredient_seeds:
            raise ValueError("soup: give at least one seed")

    def ingredients(self) -> list[tuple[int, dict[str, float]]]:
        """(seed, hyper-parameter overrides) of every ingredient, in grid order."""
        axes = [[(GRID[name], v) for v in getattr(self, name)] or [None] for name in GRID]
        return [(seed, dict(kv for kv in combo if kv is not None))
                for seed in self.ingredient_seeds for combo in itertools.product(*axes)]


def greedy_soup(ingredients: Sequence[Classifier], score: Callable[[Classifier], float],
                scores: Sequence[float]) -> tuple[Classifier, list[int], float]:
    """Recipe 1 of the paper: best ingredient first; add the next best if the soup's score strictly improves.

    ``scores[i]`` is ingredient i's held-out score; ``score`` scores a candidate soup. Returns the
    soup, the indices of its ingredients (in the order added) and its score.
    """
    order = sorted(range(len(ingredients)), key=lambda i: -scores[i])  # stable: ties keep grid order
    chosen, best = [order[0]], scores[order[0]]
    soup = average([ingredients[order[0]]], [1.0])  # a copy: the soup gets its own info
    for i in order[1:]:
        trial = average([ingredients[j] for j in chosen + [i]], [1.0 / (len(chosen) + 1)] * (len(chosen) + 1))
        trial_score = score(trial)
        if trial_score > best:
            chosen, best, soup = chosen + [i], trial_score, trial
    return soup, chosen, best


@register_method("soup", paper="Wortsman et al., Model soups: averaging weights of multiple fine-tuned models "
                 "improves accuracy without increasing inference time, ICML 2022",
                 defaults="greedy (Recipe 1, strict improvement as model-soups' main.py @ d5398f1), 5 seeds of the base")
class Soup:
    """Weight average of several fine-tuned runs (seeds × hyper-parameters): uniform, or greedy on held-out data."""

    options = SoupOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: SoupOptions = ctx.options
        if opts.kind == "greedy" and ctx.suite.val is None:
            raise ValueError(f"soup --kind greedy selects ingredients on held-out data, but suite {ctx.suite.name!r} "
                             "declares no val split; use --kind uniform")
        names, models = [], []
        for seed, overrides in opts.ingredients():
            models.append(ctx.finetuned_endpoint(opts.base, {**opts.base_options, **overrides}, seed=seed))
            names.append(" ".join([f"seed={seed}", *(f"{k}={v:g}" for k, v in overrides.items())]))
        n = len(models)
        if opts.kind == "uniform":
            soup, chosen, val_scores, soup_score = average(models, [1.0 / n] * n), list(range(n)), None, None
        else:
            held_out = held_out_top1(ctx, dict(zip(names, models)))  # one pass over val for all ingredients
            val_scores = [held_out[name] for name in names]
            soup, chosen, soup_score = greedy_soup(models, lambda m: held_out_top1(ctx, {"soup": m})["soup"],
                                                   val_scores)
        ctx.log(f"{opts.kind} soup of {len(chosen)}/{n} ingredient(s): {', '.join(names[i] for i in chosen)}")
        soup.info = replace(models[0].info, provenance={
            "pretrained": ctx.clip.pretrained, "method": "soup", "soup": {
                "kind": opts.kind, "base": opts.base, "ingredients": names, "chosen": [names[i] for i in chosen],
                "val_top1": val_scores, "soup_val_top1": soup_score}})
        out = [Candidate(f"{opts.kind} soup", soup, alpha=1.0, endpoint="finetuned", base=opts.base,
                         extra={"kind": opts.kind, "ingredients": len(chosen)})]
        if opts.evaluate_ingredients:
            out += [Candidate(f"ingredient {name}", model, base=opts.base, extra={"ingredient": i})
                    for i, (name, model) in enumerate(zip(names, models))]
        return out


def held_out_top1(ctx: MethodContext, models: dict[str, Classifier]) -> dict[str, float]:
    """Top-1 of each model on the suite's val split, in one pass (logits cached by content hash)."""
    preds = evaluate_cached(models, ctx.split_dir("val"), ctx.clip.preprocess_eval,
                            ArrayCache(Path(ctx.config.cache_dir) / "logits", ctx.log),
                            EvalOptions.from_config(ctx.config, ctx.clip.device, progress=False))
    return {name: preds.top1(name) for name in models}
