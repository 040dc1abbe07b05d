"""Per-dataset metrics. Each takes logits [N, C], labels [N] and per-sample metadata and returns a fraction."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

MetricFn = Callable[[np.ndarray, np.ndarray, Sequence[dict]], float]


def top1(logits: np.ndarray, labels: np.ndarray, metas: Sequence[dict] = ()) -> float:
    """Fraction of samples whose highest logit is the true class."""
    if len(labels) == 0:
        raise ValueError("top-1 accuracy of an empty dataset is undefined")
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())


METRICS: dict[str, MetricFn] = {"top1": top1}
# Whether a metric needs the per-sample metadata of the shards (then the logits cache is bypassed).
NEEDS_META: set[str] = set()


def compute(metric: str, logits: np.ndarray, labels: np.ndarray, metas: Sequence[dict] = ()) -> dict[str, float]:
    """The dataset's metric plus top-1 and the sample count, as stored in a result record."""
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    out = {"top1": top1(logits, labels), "n": int(len(labels))}
    if metric != "top1":
        out[metric] = METRICS[metric](logits, labels, metas)
    return out
