"""Per-dataset metrics. Each takes logits [N, C], labels [N] and per-sample metadata and returns a fraction.

Logits are over the dataset's own classes (after its spec's :meth:`~DatasetSpec.project_logits`).
The definitions follow the sources that report them:

* ``top1``: accuracy of the arg-max.
* ``macro_f1``: the mean over classes of F1 = 2·TP / (2·TP + FP + FN), over the classes *present in
  the ground truth* only, as WILDS scores iWildCam (``F1(average="macro")`` calls
  ``sklearn.metrics.f1_score(y_true, y_pred, average="macro", labels=unique(y_true))``, which is
  what runs here): a class that is predicted but absent from the ground truth adds no F1 term of
  its own, though the samples predicted as it still count as false negatives of their true classes.
* ``worst_region_acc``: the lowest accuracy over the regions of the samples' ``meta["region"]``,
  ``Other`` excluded, as WILDS' ``FMoWDataset.eval`` computes it.
* ``ece``: expected calibration error of the softmax confidence (the top probability) with 15
  equal-width bins over [0, 1], a sample in bin ``b`` when ``lo_b < conf <= hi_b``: ``Σ_b |B_b|/N ·
  |acc(B_b) − conf(B_b)|`` (Guo et al. 2017; Naeini et al. 2015). Lower is better.
* ``pm0``, ``pm10`` (ImageNet-Vid-Robust; Shankar et al., "Do Image Classifiers Generalize Across Time?",
  ICCV 2021): the samples are video frames grouped around anchor frames (``meta["anchor"]``, the frame's
  ``meta["offset"]`` from it, 0 for the anchor, and the label set it is judged against, ``meta["labels"]``).
  A frame is correct when its arg-max is *any* of its labels; pm-k is the fraction of anchors whose anchor
  frame and every frame within ``k`` of it are correct; pm0 is anchor accuracy. The same computation as
  ``score_predictions.py`` of github.com/modestyachts/imagenet-vid-robust-example @ b9ff1fe and
  imagenet-testbed's ``validate_vid_robust`` (both divide by the number of anchors).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Sequence

import numpy as np
from sklearn.metrics import f1_score

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
    return float(f1_score(labels, logits.argmax(axis=1), average="macro", labels=np.unique(labels)))


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


PMK_META = ("anchor", "offset", "labels")


def pm_k(logits: np.ndarray, labels: np.ndarray, metas: Sequence[dict], *, k: int) -> float:
    """pm-k over anchors (see the module docstring); frames without their metadata are refused."""
    logits, labels = _check(logits, labels, "pm-k")
    if len(metas) != len(labels) or any(not isinstance(m, dict) or any(f not in m for f in PMK_META) for m in metas):
        raise ValueError(f"pm-{k} needs each frame's metadata ({', '.join(PMK_META)}), which these samples lack: "
                         "convert the set from the official release with its metadata (robustbench-ft shard "
                         "imagenet-vid-robust)")
    predicted = logits.argmax(axis=1)
    anchored: dict[str, bool] = {}
    whole: dict[str, bool] = {}
    for pred, meta in zip(predicted.tolist(), metas):
        correct = pred in meta["labels"]
        anchor = str(meta["anchor"])
        if int(meta["offset"]) == 0:
            anchored[anchor] = correct
        if abs(int(meta["offset"])) <= k:
            whole[anchor] = whole.get(anchor, True) and correct
    missing = sorted(set(whole) - set(anchored))
    if missing:
        raise ValueError(f"pm-{k}: {len(missing)} frame set(s) lack their anchor frame (e.g. {missing[0]}); "
                         "convert the whole set again")
    return float(np.mean([anchored[a] and whole[a] for a in anchored])) if anchored else float("nan")


@dataclass(frozen=True)
class Metric:
    """One metric: its function, whether it reads per-sample metadata (then the logits cache, which
    keeps no metadata, is bypassed) and whether higher is better (an error metric such as ECE is not)."""

    name: str
    fn: MetricFn
    needs_meta: bool = False
    higher_is_better: bool = True


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("top1", top1),
    Metric("macro_f1", macro_f1),
    Metric("worst_region_acc", partial(worst_meta_group_accuracy, key="region", exclude=FMOW_EXCLUDED_REGIONS),
           needs_meta=True),
    Metric("ece", expected_calibration_error, higher_is_better=False),
    Metric("pm0", partial(pm_k, k=0), needs_meta=True),
    Metric("pm10", partial(pm_k, k=10), needs_meta=True),
)}


def needs_meta(names: Iterable[str]) -> bool:
    """Whether any of the metrics ``names`` reads per-sample metadata."""
    return any(METRICS[n].needs_meta for n in names)


# Reference accuracy on the classes of a class-subset shift is stored with the reference's metrics under
# these keys (imagenet-testbed's "val-on-<shift>-classes"): this module is the one place that builds or reads them.
def subset_key(shift: str, metric: str = "top1") -> str:
    """``"top1@imagenet-r"``: reference ``metric`` on the classes of ``shift``."""
    return f"{metric}@{shift}"


def subset_count_key(shift: str) -> str:
    """``"n@imagenet-r"``: how many reference samples belong to the classes of ``shift``."""
    return f"n@{shift}"


def count_key_of(key: str) -> str:
    """The count behind a metrics key: ``n@<shift>`` for a subset key, else ``n``."""
    return subset_count_key(key.split("@", 1)[1]) if "@" in key else "n"


def compute(metric: str, logits: np.ndarray, labels: np.ndarray, metas: Sequence[dict] = (),
            extra: Sequence[str] = ()) -> dict[str, float]:
    """The dataset's metric, any ``extra`` metrics, top-1 and the sample count, as stored in a result record."""
    unknown = [m for m in (metric, *extra) if m not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    out = {"top1": top1(logits, labels), "n": int(len(labels))}
    for name in dict.fromkeys((metric, *extra)):
        if name != "top1":
            out[name] = METRICS[name].fn(logits, labels, metas)
    return out
