"""The analyses of the WiSE-FT paper (Wortsman et al., CVPR 2022, Sec. 5.1 and App. E), as plain numpy.

For a zero-shot classifier ``zs`` and a fine-tuned one ``ft`` on one dataset (logits ``[N, C]``, labels):

* **prediction diversity** (App. E, Eq. 4-6): the fraction of samples where the two disagree while one of
  them is right, ``mean[(ŷ_zs = y ∧ ŷ_ft ≠ y) ∨ (ŷ_zs ≠ y ∧ ŷ_ft = y)]``;
* **CKA complement** (Eq. 10-11): ``1 − ‖S_ftᵀ S_zs‖²_F / (‖S_zsᵀ S_zs‖_F ‖S_ftᵀ S_ft‖_F)`` with ``S`` the
  column-centred representations of the samples, 10,000 of them drawn at random where there are more (as
  the paper does). The paper does not say which representation; it is computed here on the logits
  (``f(x)`` in its notation, and the only one that differs between a zero-shot model and a linear
  probe on the same encoder) and, where both models' image features are cached, on those too;
* **overrides** (Sec. 5.1): with the α = 0.5 ensemble's predictions ``ŷ_e``, the zero-shot model
  *overrides* the fine-tuned one where the two disagree and ``ŷ_e = ŷ_zs``, and *is overridden* where
  they disagree and ``ŷ_e = ŷ_ft``; the **confidence margin** δ_f is the mean difference between a
  classifier's largest and second-largest logit (unnormalised outputs, as the paper uses);
* **the α curve against its chord** (Sec. 5, observations 1 and 2): the accuracy of every α against
  ``(1 − α)·acc(0) + α·acc(1)``, whether the curve lies above the chord, and whether some α beats both
  endpoints.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

CKA_SAMPLES = 10_000  # "with distributions larger than 10,000 samples, we randomly sample 10,000" (App. E)


def prediction_diversity(logits_a: np.ndarray, logits_b: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples where exactly one of the two classifiers is right (Eq. 4-6)."""
    right_a = np.asarray(logits_a).argmax(1) == labels
    right_b = np.asarray(logits_b).argmax(1) == labels
    return float(np.mean(right_a != right_b))


def cka_complement(a: np.ndarray, b: np.ndarray, *, samples: int = CKA_SAMPLES, seed: int = 0) -> float:
    """1 − linear CKA of two representations of the same samples (rows), columns centred (Eq. 10-11)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"CKA compares the same samples: got {a.shape[0]} and {b.shape[0]} rows")
    if a.shape[0] > samples:
        keep = np.sort(np.random.default_rng(seed).choice(a.shape[0], samples, replace=False))
        a, b = a[keep], b[keep]
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    cross = np.linalg.norm(b.T @ a) ** 2
    denominator = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
    return float(1.0 - cross / denominator) if denominator > 0 else float("nan")


def margin(logits: np.ndarray) -> np.ndarray:
    """Per sample: the largest logit minus the second largest."""
    top2 = np.sort(np.asarray(logits, dtype=np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def overrides(zs: np.ndarray, ft: np.ndarray, ensemble: np.ndarray) -> dict[str, float]:
    """How often the zero-shot model overrides, or is overridden by, the fine-tuned one in the ensemble,
    and the two models' mean confidence margins, over all samples and where each wins."""
    p_zs, p_ft, p_e = (np.asarray(x).argmax(1) for x in (zs, ft, ensemble))
    disagree = p_zs != p_ft
    overriding, overridden = disagree & (p_e == p_zs), disagree & (p_e == p_ft)
    m_zs, m_ft = margin(zs), margin(ft)

    def mean_on(values: np.ndarray, mask: np.ndarray) -> float | None:
        return float(values[mask].mean()) if mask.any() else None

    return {"disagree": float(disagree.mean()), "zeroshot_overrides": float(overriding.mean()),
            "zeroshot_overridden": float(overridden.mean()),
            "margin_zeroshot": float(m_zs.mean()), "margin_finetuned": float(m_ft.mean()),
            "margin_difference": float(m_zs.mean() - m_ft.mean()),
            "margin_zeroshot_where_it_overrides": mean_on(m_zs, overriding),
            "margin_finetuned_where_it_overrides": mean_on(m_ft, overridden)}


def curve_against_chord(accuracy: Mapping[float, float]) -> dict[str, Any]:
    """Observations 1 and 2 for one dataset: each interior α's accuracy minus the chord's, whether all of
    them lie above it, and the best α with its gain over the better endpoint."""
    if 0.0 not in accuracy or 1.0 not in accuracy:
        raise ValueError("the chord needs both endpoints (α = 0 and α = 1)")
    a0, a1 = accuracy[0.0], accuracy[1.0]
    interior = sorted(a for a in accuracy if 0.0 < a < 1.0)
    above = {a: accuracy[a] - ((1 - a) * a0 + a * a1) for a in interior}
    best = max(sorted(accuracy), key=lambda a: (accuracy[a], -a))
    return {"above_chord": {f"{a:g}": float(v) for a, v in above.items()},
            "all_above_chord": bool(above) and all(v >= 0 for v in above.values()),
            "best_alpha": float(best), "best_gain_over_endpoints": float(accuracy[best] - max(a0, a1)),
            "beats_both_endpoints": accuracy[best] > max(a0, a1)}
