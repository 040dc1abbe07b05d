"""Methods whose candidates lie on a curve from the zero-shot to a fine-tuned classifier, indexed by α
(WiSE-FT's weight-space and the output-space ensembles; any later one), and how their α is chosen.

Choosing α is choosing a hyper-parameter, so it must not be done on test or shift data. Every curve
therefore also yields a **selected** candidate, the α of a grid (0:1:0.1 by default) with the best
reference metric on the suite's held-out *val* split (ties go to the smaller α; the scores of the whole
grid are recorded with it). The α values a user fixes before seeing any result (``--fixed-alpha``, 0.5
by default as the WiSE-FT paper recommends, or a lone ``--alpha``) are candidates of their own. Every
other α of a sweep is an *oracle* row: picking the best of them by its test or shift accuracy is a
choice made on test data, so the leaderboard shows them unranked (see ``board/leaderboard.py``).
The endpoints, zero-shot (α = 0) and fine-tuned (α = 1), are methods of their own and ranked as such.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

import torch

from robustbench_ft import metrics
from robustbench_ft.datasets.registry import get_dataset
from robustbench_ft.evaluation.cache import ArrayCache
from robustbench_ft.evaluation.dataset_pass import evaluate_cached
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.evaluation.scoring import logits_for
from robustbench_ft.methods.context import Candidate, MethodContext, alpha_label, parse_alphas
from robustbench_ft.methods.registry import METHOD_ALIASES

SELECTION_GRID = tuple(round(0.1 * i, 10) for i in range(11))


@dataclass(frozen=True)
class CurveOptions:
    """The α values of a curve, how α is chosen, and where its fine-tuned endpoint comes from."""

    alpha: Annotated[tuple[float, ...], parse_alphas] = (0.5,)  # α values evaluated (0 = zero-shot, 1 = fine-tuned)
    fixed_alpha: Annotated[tuple[float, ...], parse_alphas] = (0.5,)  # α values that are methods of their own
    select: bool = True               # also choose α on the suite's val split (a candidate of its own)
    select_grid: Annotated[tuple[float, ...], parse_alphas] = SELECTION_GRID  # the α values tried on val
    base: str = "finetune"            # registered method producing the fine-tuned endpoint (ft, lp: short names)
    finetuned: str | None = None      # a checkpoint (file or hf-hub: reference) to use as the endpoint instead of training one
    base_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("alpha", "fixed_alpha", "select_grid"):
            object.__setattr__(self, name, parse_alphas(getattr(self, name)))
        object.__setattr__(self, "base", METHOD_ALIASES.get(self.base, self.base))

    def choice_of(self, alpha: float) -> str:
        """How an evaluated α was chosen: "fixed" before any result, else "oracle" (see the module docstring)."""
        return "fixed" if alpha in self.fixed_alpha or len(self.alpha) == 1 else "oracle"


@dataclass(frozen=True)
class AlphaSelection:
    """The α chosen on held-out data, and everything that went into the choice."""

    alpha: float
    split: str                    # "dataset/split" scored
    metric: str
    grid: tuple[float, ...]
    scores: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "split": self.split, "metric": self.metric, "rule": "best on val, ties to the "
                "smaller alpha", "grid": list(self.grid), "scores": [float(s) for s in self.scores]}


def select_alpha(ctx: MethodContext, models: dict[float, torch.nn.Module]) -> AlphaSelection:
    """Score every α's model on the suite's val split (one pass, logits cached) by the reference dataset's
    metric; the best α, ties to the smaller. Reads only the val split."""
    val_dataset, val_split = ctx.suite.val or ("", "")
    directory = ctx.split_dir("val")
    spec = get_dataset(val_dataset)
    grid = tuple(sorted(models))
    named = {alpha_label(a): models[a] for a in grid}
    preds = evaluate_cached(named, directory, ctx.clip.preprocess_eval,
                            ArrayCache(Path(ctx.config.cache_dir) / "logits", ctx.log),
                            EvalOptions.from_config(ctx.config, ctx.clip.device, progress=ctx.progress),
                            desc=f"choosing α on {val_dataset}/{val_split}",
                            keep_meta=metrics.needs_meta((spec.metric,)),
                            num_outputs=len(get_dataset(ctx.suite.reference).classnames))
    scores = []
    for a in grid:
        logits = logits_for(models[a], preds.logits[alpha_label(a)], spec.project_logits)
        scores.append(metrics.compute(spec.metric, logits, preds.labels, preds.metas)[spec.metric])
    best = max(range(len(grid)), key=lambda i: (scores[i], -grid[i]))  # ties: the smaller α
    return AlphaSelection(grid[best], f"{val_dataset}/{val_split}", spec.metric, grid, tuple(scores))


def endpoint_candidates(method: str, zeroshot: torch.nn.Module, finetuned: torch.nn.Module, base: str, *,
                        from_checkpoint: bool = False) -> list[Candidate]:
    """The two ends of the curve ``method/base``: the zero-shot (α = 0) and the fine-tuned (α = 1) candidate."""
    curve = f"{method}/{base}"
    return [Candidate("zeroshot", zeroshot, alpha=0.0, curve=curve, endpoint="zeroshot"),
            Candidate("finetuned" if from_checkpoint else base, finetuned, alpha=1.0, curve=curve,
                      endpoint="finetuned", base=base)]


def curve_candidates(ctx: MethodContext, opts: CurveOptions, method: str, zeroshot: torch.nn.Module,
                     finetuned: torch.nn.Module, base: str, mix: Callable[[float], torch.nn.Module]) -> list[Candidate]:
    """The endpoints, one candidate per α of ``opts.alpha`` and, with ``opts.select``, the α chosen on val.

    ``mix(α)`` builds the curve's classifier at α in (0, 1); one model per α is built and shared, so a
    selected α that is also evaluated costs one encoder pass, and its logits are cached once.
    """
    curve = f"{method}/{base}"
    built: dict[float, torch.nn.Module] = {0.0: zeroshot, 1.0: finetuned}

    def at(alpha: float) -> torch.nn.Module:
        if alpha not in built:
            built[alpha] = mix(alpha)
        return built[alpha]

    out = endpoint_candidates(method, zeroshot, finetuned, base, from_checkpoint=bool(opts.finetuned))
    for alpha in opts.alpha:
        if 0.0 < alpha < 1.0:
            out.append(Candidate(f"{method} α={alpha_label(alpha)}", at(alpha), alpha=alpha, curve=curve, base=base,
                                 choice=opts.choice_of(alpha)))
    if opts.select:
        selection = select_alpha(ctx, {a: at(a) for a in opts.select_grid})
        ctx.log(f"{method}: α = {alpha_label(selection.alpha)} chosen on {selection.split} "
                f"({selection.metric} {100 * max(selection.scores):.2f}%)")
        out.append(Candidate(f"{method} α chosen on val", at(selection.alpha), alpha=selection.alpha, curve=curve,
                             base=base, choice="val", extra={"selection": selection.to_json()}))
    return out
