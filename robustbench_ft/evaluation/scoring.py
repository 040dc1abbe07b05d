"""From outputs to metrics: every dataset of a suite scored for many models, in one pass per dataset.

The runner and the baseline zoo both score through :func:`score_suite`, so each dataset's label
handling (``DatasetSpec.project_logits``: class subsets, pooling) and metrics apply to every model
the same way. A model outputs raw columns over the reference's classes; how they become logits
over a dataset's classes is the model's ``score_outputs(raw, project)`` where it declares one (a
probability ensemble projects each member's logits before its softmax), else ``project(raw)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from robustbench_ft import metrics
from robustbench_ft.datasets.spec import DatasetSpec
from robustbench_ft.evaluation.cache import ArrayCache
from robustbench_ft.evaluation.dataset_pass import evaluate_cached
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.shards.urls import load_manifest

Projection = Callable[[np.ndarray], np.ndarray]


def logits_for(model: torch.nn.Module, raw: np.ndarray, project: Projection) -> np.ndarray:
    """A model's outputs as logits over a dataset's classes (see the module docstring)."""
    score_outputs = getattr(model, "score_outputs", None)
    return score_outputs(raw, project) if score_outputs is not None else project(raw)


def reference_subset_scores(model: torch.nn.Module, raw: np.ndarray, labels: np.ndarray,
                            shifts: Mapping[str, DatasetSpec] | list[DatasetSpec]) -> dict[str, float]:
    """Reference accuracy on each class-subset shift's classes (``metrics.subset_key``), with the count.

    Shifts whose classes map into the reference's (``maps_labels``) contribute, scored on the
    reference samples of their classes as they score themselves: the x of their effective robustness.
    """
    out: dict[str, float] = {}
    for spec in (shifts.values() if isinstance(shifts, Mapping) else shifts):
        if spec.maps_labels:
            keep, own = spec.reference_rows(labels)
            if keep.any():
                out[metrics.subset_key(spec.name)] = metrics.top1(logits_for(model, np.asarray(raw)[keep],
                                                                             spec.project_logits), own)
                out[metrics.subset_count_key(spec.name)] = int(keep.sum())
    return out


@dataclass
class SuiteScores:
    """Metrics per model and dataset (``metrics[model][dataset]``), seconds per dataset, and what a
    ``--on-bad-sample skip`` pass left out per dataset."""

    metrics: dict[str, dict[str, dict]]
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, dict] = field(default_factory=dict)


def score_suite(models: Mapping[str, torch.nn.Module], specs: Mapping[str, DatasetSpec], dirs: Mapping[str, Path | str],
                reference: str, transform: Callable, options: EvalOptions, *, cache: ArrayCache | None = None,
                features: ArrayCache | None = None, log: Callable[[str], None] = print) -> SuiteScores:
    """Evaluate every model on every dataset in ``specs`` (shards at ``dirs``), one pass per dataset.

    ``reference`` names the dataset whose classes the models output: the other datasets' specs map
    onto them, and the reference's metrics also hold its accuracy on each class-subset shift's
    classes. A shard set built with files skipped says how many (``num_skipped``).
    """
    scores = SuiteScores({name: {} for name in models})
    width = len(specs[reference].classnames)
    for name, spec in specs.items():
        preds = evaluate_cached(models, dirs[name], transform, cache, options, desc=f"eval {name}",
                                keep_meta=metrics.needs_meta((spec.metric, *spec.extra_metrics)),
                                num_outputs=width, features=features)
        scores.seconds[name] = preds.seconds
        if preds.skipped:
            scores.skipped[name] = preds.skipped
            log(f"warning: {name}: skipped {preds.skipped['count']} unreadable sample(s); its metrics are over the "
                f"{len(preds.labels)} read (listed in the records)")
        built_without = load_manifest(dirs[name]).metadata.get("num_skipped")
        for model_name, model in models.items():
            raw = preds.logits[model_name]
            result = metrics.compute(spec.metric, logits_for(model, raw, spec.project_logits), preds.labels,
                                     preds.metas, spec.extra_metrics)
            if built_without is not None:
                result["num_skipped"] = int(built_without)
            if name == reference:
                result.update(reference_subset_scores(model, raw, preds.labels, specs))
            scores.metrics[model_name][name] = result
    return scores
