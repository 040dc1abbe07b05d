"""Metrics against scikit-learn and hand-computed cases; label projection of dataset specs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from robustbench_ft import metrics
from robustbench_ft.datasets.spec import DatasetSpec
from robustbench_ft.evaluation.scoring import reference_subset_scores


def _onehot_logits(pred: list[int], num_classes: int) -> np.ndarray:
    return np.eye(num_classes)[pred] * 5.0


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn_over_classes_present_in_the_ground_truth(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, size=80)  # classes 6..9 never occur, but are predicted
    logits = rng.normal(size=(80, 10))
    pred = logits.argmax(axis=1)
    expected = f1_score(labels, pred, average="macro", labels=np.unique(labels))
    assert metrics.macro_f1(logits, labels) == pytest.approx(expected, abs=1e-12)
    # ...which is not sklearn's default macro-F1 over every class seen in labels or predictions
    assert metrics.macro_f1(logits, labels) != pytest.approx(f1_score(labels, pred, average="macro"))


def test_top1_and_hand_computed_macro_f1():
    labels = np.array([0, 0, 1, 1])
    logits = _onehot_logits([0, 1, 1, 2], 3)  # class 2 is predicted but absent
    assert metrics.top1(logits, labels) == 0.5
    # class 0: tp 1, fp 0, fn 1 -> 2/3; class 1: tp 1, fp 1, fn 1 -> 1/2
    assert metrics.macro_f1(logits, labels) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_worst_region_accuracy_excludes_other_as_wilds_does():
    labels = np.zeros(7, dtype=int)
    logits = _onehot_logits([0, 0, 1, 0, 1, 1, 1], 2)
    regions = ["Asia", "Asia", "Asia", "Europe", "Europe", "Other", "Other"]
    metas = [{"region": r} for r in regions]
    assert metrics.group_accuracies(logits, labels, regions) == {"Asia": 2 / 3, "Europe": 0.5, "Other": 0.0}
    assert metrics.METRICS["worst_region_acc"].fn(logits, labels, metas) == 0.5
    assert metrics.worst_group_accuracy(logits, labels, regions) == 0.0
    with pytest.raises(ValueError, match="no 'region' in its metadata"):
        metrics.METRICS["worst_region_acc"].fn(logits, labels, [{}] * 7)


def test_ece_hand_computed_with_15_bins():
    # confidences 0.9 (bin 14/15: (0.8667, 0.9333]) and 0.6 (bin 9: (0.5333, 0.6]).
    p_hi, p_lo = 0.9, 0.6
    logits = np.log(np.array([[p_hi, 1 - p_hi]] * 4 + [[p_lo, 1 - p_lo]] * 2))
    labels = np.array([0, 0, 0, 1, 0, 1])  # bin 0.9: acc 3/4; bin 0.6: acc 1/2
    expected = 4 / 6 * abs(0.75 - 0.9) + 2 / 6 * abs(0.5 - 0.6)
    assert metrics.expected_calibration_error(logits, labels) == pytest.approx(expected)
    confident = np.log(np.array([[1.0 - 1e-12, 1e-12]] * 3))
    assert metrics.expected_calibration_error(confident, np.zeros(3, dtype=int)) == pytest.approx(0.0, abs=1e-9)


def test_compute_stores_metric_extras_top1_and_count():
    labels = np.array([0, 1, 1])
    logits = _onehot_logits([0, 1, 0], 2)
    out = metrics.compute("macro_f1", logits, labels, extra=("ece", "top1"))
    assert set(out) == {"top1", "n", "macro_f1", "ece"} and out["n"] == 3 and out["top1"] == pytest.approx(2 / 3)
    with pytest.raises(KeyError, match="unknown metric"):
        metrics.compute("f2", logits, labels)


def _spec(**kw) -> DatasetSpec:
    n = len(kw.get("class_subset") or kw.get("pooling") or ()) or 4
    return DatasetSpec(kw.pop("name", "x"), tuple(f"c{i}" for i in range(n)), ("{}",), **kw)


def test_class_subset_restricts_logits_and_reference_samples():
    spec = _spec(class_subset=(1, 3))
    logits = np.array([[9.0, 1, 0, 2], [0, 1, 9, 2], [0, 0, 0, 5]])
    assert spec.project_logits(logits).tolist() == [[1, 2], [1, 2], [0, 5]]
    sub_logits, sub_labels = spec.project_reference(logits, np.array([1, 2, 3]))
    assert sub_labels.tolist() == [0, 1] and sub_logits.tolist() == [[1, 2], [0, 5]]
    scores = reference_subset_scores(torch.nn.Identity(), logits, np.array([1, 2, 3]), [spec, _spec(name="plain")])
    assert scores == {"top1@x": 0.5, "n@x": 2}


def test_pooling_takes_the_max_of_the_mapped_reference_logits():
    spec = _spec(pooling=((0, 2), (3,)))
    logits = np.array([[1.0, 9, 4, 2], [0, 0, 1, 3]])
    assert spec.project_logits(logits).tolist() == [[4, 2], [1, 3]]
    _, labels = spec.project_reference(logits, np.array([2, 3]))
    assert labels.tolist() == [0, 1]


def test_spec_mappings_are_checked():
    with pytest.raises(ValueError, match="class_subset or pooling, not both"):
        _spec(class_subset=(0,), pooling=((0,),))
    with pytest.raises(ValueError, match="2 classes but a label mapping for 1"):
        DatasetSpec("x", ("a", "b"), ("{}",), class_subset=(0,))
    with pytest.raises(ValueError, match="up to 9, but the classifier outputs only 4"):
        _spec(class_subset=(1, 9)).project_logits(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="outputs 3 classes but dataset 'x' has 4"):
        _spec().project_logits(np.zeros((2, 3)))
