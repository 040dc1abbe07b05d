"""Per-dataset metrics. Each takes logits [N, C], labels [N] and per-sample metadata and returns a fraction.

Logits are over the dataset's own classes (after its spec's :meth:`~DatasetSpec.project_logits`).
The definitions follow the sources that report them:

* ``top1``: accuracy of the arg-max.
* ``macro_f1``: the mean over classes of F1 = 2·TP / (2·TP + FP + FN), over the classes *present in
  the ground truth* only, as WILDS scores iWildCam (``F1(average="macro")`` calls
  ``sklearn.metrics.f1_score(y_true, y_pred, average="macro", labels=unique(y_true))``): a class
  that is predicted but absent from the ground truth adds no F1 term of its own, though the
  samples predicted as it still count as false negatives of their true classes.
* ``worst_region_acc``: the lowest accuracy over the regions of the samples' ``meta["region"]``,
  ``Other`` excluded, as WILDS' ``FMoWDataset.eval`` computes it.
* ``ece``: expected calibration error of the softmax confidence (the top probability) with 15
  equal-width bins over [0, 1], a sample in bin ``b`` when ``lo_b < conf <= hi_b``: ``Σ_b |B_b|/N ·
  |acc(B_b) − conf(B_b)|`` (Guo et al. 2017; Naeini et al. 2015). Lower is better.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterable, Sequence

import numpy as np

MetricFn = Callable[[np.ndarray, np.ndarray, Sequence[dict]], float]
ECE_BINS = 15
FMOW_EXCLUDED_REGIONS = ("Other",)


def _check(logits: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = np.asarray(logits), np.asarray(labels)
    if len(labels) == 0:
        raise ValueError(f"{what} of an empty dataset is undefined")
    if logits.ndim != 2 or logits.shape[0] != len(labels):
        raise ValueError(f"{what}: logits must be [N, classes] for N={len(labels)} labels, got shape {logits.shape}")
    return logits, labels


def top1(logits: np.ndarray, labels: np.ndarray, metas: Sequence[dict] = ()) -> float:
    """Fraction of samples whose highest logit is the true class."""
    logits, labels = _check(logits, labels, "top-1 accuracy")
    return float((logits.argmax(axis=1) == labels).mean())


def macro_f1(logits: np.ndarray, labels: np.ndarray, metas: Sequence[dict] = ()) -> float:
    """Mean F1 over the classes present in ``labels`` (WILDS' iWildCam metric; see the module docstring)."""
    logits, labels = _check(logits, labels, "macro-F1")
    pred = logits.argmax(axis=1)
    scores = []
    for c in np.unique(labels):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        scores.append(2.0 * tp / (2.0 * tp + fp + fn))  # fn + tp >= 1: c is present
    return float(np.mean(scores))


def group_accuracies(logits: np.ndarray, labels: np.ndarray, groups: Sequence) -> dict:
    """Accuracy of each group (groups with no sample are absent)."""
    logits, labels = _check(logits, labels, "group accuracy")
    groups = np.asarray([str(g) for g in groups])
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} group values for {len(labels)} samples")
    correct = logits.argmax(axis=1) == labels
    return {g: float(correct[groups == g].mean()) for g in sorted(set(groups.tolist()))}


def worst_group_accuracy(logits: np.ndarray, labels: np.ndarray, groups: Sequence,
                         exclude: Iterable[str] = ()) -> float:
    """The lowest accuracy over the groups present, leaving out the groups in ``exclude``."""
    excluded = set(exclude)
    accs = {g: a for g, a in group_accuracies(logits, labels, groups).items() if g not in excluded}
    if not accs:
        raise ValueError(f"no group left to score after excluding {sorted(excluded)}")
    return min(accs.values())


def worst_meta_group_accuracy(logits: np.ndarray, labels: np.ndarray, metas: Sequence[dict], *, key: str,
                              exclude: Iterable[str] = ()) -> float:
    """:func:`worst_group_accuracy` with each sample's group read from ``meta[key]`` (shards' ``.json``)."""
    if len(metas) != len(labels):
        raise ValueError(f"worst-group accuracy needs per-sample metadata: got {len(metas)} for {len(labels)} samples")
    missing = next((i for i, m in enumerate(metas) if key not in m), None)
    if missing is not None:
        raise ValueError(f"sample {missing} has no {key!r} in its metadata (keys: {sorted(metas[missing])}); "
                         "rebuild the shards with the dataset's converter, which records it")
    return worst_group_accuracy(logits, labels, [m[key] for m in metas], exclude)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, metas: Sequence[dict] = (),
                               n_bins: int = ECE_BINS) -> float:
    """ECE of the top softmax probability, ``n_bins`` equal-width bins (see the module docstring)."""
    logits, labels = _check(logits, labels, "calibration error")
    probs = softmax(logits)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


METRICS: dict[str, MetricFn] = {
    "top1": top1,
    "macro_f1": macro_f1,
    "worst_region_acc": partial(worst_meta_group_accuracy, key="region", exclude=FMOW_EXCLUDED_REGIONS),
    "ece": expected_calibration_error,
}
# Whether a metric needs the per-sample metadata of the shards (then the logits cache is bypassed).
NEEDS_META: set[str] = {"worst_region_acc"}


def compute(metric: str, logits: np.ndarray, labels: np.ndarray, metas: Sequence[dict] = (),
            extra: Sequence[str] = ()) -> dict[str, float]:
    """The dataset's metric, any ``extra`` metrics, top-1 and the sample count, as stored in a result record."""
    unknown = [m for m in (metric, *extra) if m not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    out = {"top1": top1(logits, labels), "n": int(len(labels))}
    for name in dict.fromkeys((metric, *extra)):
        if name != "top1":
            out[name] = METRICS[name](logits, labels, metas)
    return out


def reference_subset_scores(logits: np.ndarray, labels: np.ndarray, shifts: Iterable) -> dict[str, float]:
    """Reference accuracy on each class-subset shift's classes: ``{"top1@<shift>": acc, "n@<shift>": n}``.

    ``shifts`` are dataset specs; those whose classes map into the reference's (``maps_labels``)
    contribute, scored on the reference samples of their classes as they score themselves
    (``DatasetSpec.project_reference``). This is the x value of their effective robustness.
    """
    out: dict[str, float] = {}
    for spec in shifts:
        if getattr(spec, "maps_labels", False):
            sub_logits, sub_labels = spec.project_reference(logits, labels)
            if len(sub_labels):
                out[f"top1@{spec.name}"] = top1(sub_logits, sub_labels)
                out[f"n@{spec.name}"] = int(len(sub_labels))
    return out
