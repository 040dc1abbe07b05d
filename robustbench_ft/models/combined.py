"""Classifiers combined in output space: members' logits side by side, mixed as logits or as probabilities.

* :class:`MemberLogits` runs several classifiers on a batch and puts their logits side by side
  (``[B, M·C]``); members that share an image encoder run it once.
* :class:`LogitMixture` is a :class:`Classifier` whose head mixes those logits linearly,
  ``Σ_m w_m·z_m`` (the output-space ensemble of Wortsman et al. 2022). Being a Classifier over
  the members' pass, every α of a sweep built on the same members shares one forward pass.
* :class:`ProbabilityMixture` mixes *probabilities*, ``p(y|x) = Σ_m w_m(x)·softmax(z_m(x)/T_m)``,
  with constant or per-sample weights (VRF's sample-wise ensemble). A probability mixture is not
  linear in the logits, so its outputs are the members' raw logits (and the weights); how they
  become a dataset's logits is :meth:`ProbabilityMixture.score_outputs`, which applies the
  dataset's label mapping (``DatasetSpec.project_logits``: ImageNet-R's class subset, ObjectNet's
  pooling) to **each member's logits before its softmax**, as VRF's code does, and returns the log
  of the mixture.

Why the order matters: projecting the log of a mixture of full 1000-way softmaxes restricts the
mixture *after* each member spread probability over all 1000 classes, so a member that puts much
of its mass outside the 200 classes counts for less inside them than its weight says;
projecting first makes each member a distribution over the dataset's own classes, and the
weights mean what they say. For a linear (logit) mixture the two orders agree on class subsets;
for max-pooling they do not, and :class:`LogitMixture` pools the mixed logits.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
import torch

from robustbench_ft.models.classifier import Classifier

Projection = Callable[[np.ndarray], np.ndarray]


class MemberLogits(torch.nn.Module):
    """The logits of ``members`` side by side, ``[B, M·C]``; members sharing an encoder module run it once.

    :meth:`outputs` also returns each member's L2-normalised image features (for weights that depend
    on them).
    """

    def __init__(self, members: Sequence[Classifier]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a combination needs at least two classifiers, got {len(members)}")
        widths = {m.num_classes for m in members}
        if len(widths) != 1:
            raise ValueError(f"the classifiers of a combination must share a label space; they output {sorted(widths)}")
        self.members = torch.nn.ModuleList(members)

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    def outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(each member's logits, each member's image features), one encoder pass per distinct encoder."""
        computed: dict[int, torch.Tensor] = {}
        logits, features = [], []
        for member in self.members:
            key = id(member.visual)
            if key not in computed:
                computed[key] = member.features(images)
            features.append(computed[key])
            logits.append(member.head(computed[key]))
        return logits, features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.outputs(images)[0], dim=-1)


class LogitMixture(Classifier):
    """``Σ_m w_m·z_m``: a linear head over :class:`MemberLogits` (the output-space ensemble).

    Its "encoder" is the members' pass and its head the mixing matrix, so mixtures of the same
    members (every α of a sweep) share that pass in evaluation.
    """

    def __init__(self, members: MemberLogits, weights: Sequence[float]):
        if len(weights) != len(members.members) or any(w < 0 for w in weights):
            raise ValueError(f"need one non-negative weight per member ({len(members.members)}), got {list(weights)}")
        eye = torch.eye(members.num_classes)
        info = copy.deepcopy(members.members[0].info)
        info.provenance.update({"logit_mixture": list(map(float, weights)),
                                "members": [m.info.provenance for m in members.members[1:]]})
        super().__init__(members, torch.cat([w * eye for w in weights], dim=1), info)
        self.to(members.members[0].head.weight.device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)  # the members' logits: not normalised, unlike image features


class ConstantWeights(torch.nn.Module):
    """Mixture weights that do not depend on the sample: ``w`` for every row (they must sum to 1)."""

    def __init__(self, weights: Sequence[float]):
        super().__init__()
        w = torch.tensor([float(x) for x in weights])
        if (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"mixture weights must be non-negative and sum to 1, got {list(weights)}")
        self.register_buffer("weights", w)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.weights.to(features[0].device).expand(len(features[0]), -1)


class ProbabilityMixture(torch.nn.Module):
    """``p(y|x) = Σ_m w_m(x)·softmax(z_m(x)/T_m)`` over :class:`MemberLogits` (see the module docstring).

    ``weights`` maps the members' image features (a list, one ``[B, D]`` per member) to ``[B, M]``
    weights whose rows sum to 1 (:class:`ConstantWeights` for a fixed mixture). ``temperatures``
    (one per member, > 0) divide each member's logits before its softmax; they are buffers, so they
    count in the model's content hash (and so in its cached outputs).
    """

    def __init__(self, members: MemberLogits, temperatures: Sequence[float], weights: torch.nn.Module):
        super().__init__()
        if len(temperatures) != len(members.members) or any(not t > 0 for t in temperatures):
            raise ValueError(f"need one positive temperature per member ({len(members.members)}), "
                             f"got {list(temperatures)}")
        self.members = members
        self.weights = weights
        self.register_buffer("temperatures", torch.tensor([float(t) for t in temperatures]))

    @property
    def output_width(self) -> int:
        """Columns of the raw outputs: every member's logits, then the M mixture weights."""
        m = len(self.members.members)
        return m * self.members.num_classes + m

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, features = self.members.outputs(images)
        return torch.cat([*logits, self.weights(features).to(logits[0].dtype)], dim=-1)

    def split(self, raw: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """(each member's logits [N, C], the weights [N, M]) of raw outputs."""
        m, c = len(self.members.members), self.members.num_classes
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != m * c + m:
            raise ValueError(f"expected raw outputs of width {m * c + m} ({m} members x {c} classes + {m} weights), "
                             f"got shape {raw.shape}")
        return [raw[:, i * c:(i + 1) * c] for i in range(m)], raw[:, m * c:]

    def probabilities(self, raw: np.ndarray, project: Projection = lambda z: z) -> np.ndarray:
        """The mixture ``[N, C_dataset]``: each member's logits projected, divided by its temperature,
        softmaxed, then weighted and summed."""
        logits, weights = self.split(raw)
        temperatures = self.temperatures.cpu().double().numpy()
        mixture = 0.0
        for i, z in enumerate(logits):
            z = np.asarray(project(z), dtype=np.float64) / temperatures[i]
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z)
            mixture = mixture + weights[:, i:i + 1] * (p / p.sum(axis=1, keepdims=True))
        return mixture

    def score_outputs(self, raw: np.ndarray, project: Projection) -> np.ndarray:
        """Logits over a dataset's classes for scoring: the log of :meth:`probabilities` (its argmax is
        the mixture's prediction; its softmax is the mixture itself, for calibration metrics)."""
        return np.log(np.maximum(self.probabilities(raw, project), np.finfo(np.float64).tiny))
