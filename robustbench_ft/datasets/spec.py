"""DatasetSpec and Suite: what a dataset is and how it is scored, and a reference distribution with its shifts.

A ``DatasetSpec`` says what a dataset *is* (class names, prompt templates, the metric the field
reports for it, how its labels relate to the reference classes) and where its shards live; the
evaluation loop never special-cases a dataset. A ``Suite`` is a reference distribution plus its
shifts, the split used for fine-tuning, the held-out split for choices, and the baseline its
effective robustness is measured against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from robustbench_ft.shards.manifest import Manifest

if TYPE_CHECKING:
    from robustbench_ft.convert.sources import ConvertOptions


BuildFn = Callable[[Path], Manifest]
"""Builds one split's shards into the given directory (for datasets the harness can make itself)."""
ConvertFn = Callable[[Path, Path, str, "ConvertOptions"], Manifest]
"""Converts a user's official download (``src``) of one split into shards in ``out``: ``(src, out, split, options)``."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: what it is, how its labels relate to the reference classes, and how it is scored.

    Classifiers always output logits over the suite's *reference* classes (the zero-shot head is
    built from the reference's class names, and fine-tuning keeps that head). A shift whose classes
    differ says how to read those logits, and :meth:`project_logits` does it, so the evaluation loop
    never special-cases a dataset:

    * ``class_subset`` (ImageNet-R, ImageNet-A): the dataset's class ``i`` is reference class
      ``class_subset[i]``; logits are restricted to those columns, as the field does (Hendrycks et
      al.; wise-ft's ``project_logits``), so a prediction outside the subset is impossible.
    * ``pooling`` (ObjectNet): the dataset's class ``i`` stands for the reference classes
      ``pooling[i]``; its logit is the *max* over them, as wise-ft's ``ObjectNetBase.project_logits``
      does. imagenet-testbed instead counts an argmax over the pooled ImageNet columns as correct
      when it falls in the class's set, which is the same decision; a sum would not be.

    Datasets without either have the reference's classes and their logits are used as they are.
    The shards of such a dataset store labels as positions in *its own* class list.

    ``border_crop`` is preprocessing the field applies to a dataset's images (ObjectNet: 2 pixels
    off every edge, to remove its 1-pixel red frame). It is applied by the converter, to the
    original image and before any ``--resize-shorter``, because a crop after resizing would cut a
    different part of the image; the manifest records it, and ``robustbench-ft shard objectnet
    --border-crop 0`` turns it off (the logits cache keys on the shards, so the two never mix).
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    metric: str = "top1"
    description: str = ""
    source: str = ""
    # split name -> builder; datasets users bring (ImageNet, WILDS) have none and are converted with `shard`.
    builders: dict[str, BuildFn] = field(default_factory=dict, compare=False, repr=False)
    splits: tuple[str, ...] = ("test",)
    class_subset: tuple[int, ...] | None = None
    pooling: tuple[tuple[int, ...], ...] | None = None
    # Metrics stored beside `metric` (and top-1, always stored), e.g. worst-region accuracy on an ID split.
    extra_metrics: tuple[str, ...] = ()
    # Pixels cut from every edge of each source image at conversion, before any resize (see above).
    border_crop: int = 0
    # How `robustbench-ft shard NAME` converts the official download; None for datasets the harness builds.
    converter: ConvertFn | None = field(default=None, compare=False, repr=False)
    # The classes as its shards name them (manifest "classes"), in label order: ImageNet's wnids,
    # iWildCam's category ids. None: the class names themselves.
    class_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.class_subset is not None and self.pooling is not None:
            raise ValueError(f"dataset {self.name!r}: give class_subset or pooling, not both")
        mapping = self.class_subset if self.class_subset is not None else self.pooling
        if mapping is not None and len(mapping) != len(self.classnames):
            raise ValueError(f"dataset {self.name!r}: {len(self.classnames)} classes but a label mapping for "
                             f"{len(mapping)}; the mapping needs one entry per class")
        if self.pooling is not None and not all(self.pooling):
            raise ValueError(f"dataset {self.name!r}: every pooled class needs at least one reference class")
        if self.border_crop < 0:
            raise ValueError(f"dataset {self.name!r}: border_crop must be >= 0, got {self.border_crop}")
        if self.class_ids is not None and len(self.class_ids) != len(self.classnames):
            raise ValueError(f"dataset {self.name!r}: {len(self.classnames)} class names but {len(self.class_ids)} "
                             "class ids")

    @property
    def shard_classes(self) -> tuple[str, ...]:
        """The class list a shard set of this dataset must carry in its manifest, in label order."""
        return self.class_ids if self.class_ids is not None else self.classnames

    def path(self, root: Path, split: str = "test") -> Path:
        """Directory holding the shards of one split: ``<root>/<name>/<split>``."""
        if split not in self.splits:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; it has {list(self.splits)}")
        return Path(root) / self.name / split

    @property
    def maps_labels(self) -> bool:
        """Whether this dataset's classes are a subset or pooling of the reference's."""
        return self.class_subset is not None or self.pooling is not None

    def project_logits(self, logits: np.ndarray) -> np.ndarray:
        """Logits over the reference classes ``[N, C_ref]`` -> logits over this dataset's classes ``[N, C]``."""
        logits = np.asarray(logits)
        if logits.ndim != 2:
            raise ValueError(f"dataset {self.name!r}: logits must be [N, classes], got shape {logits.shape}")
        width = logits.shape[1]
        if not self.maps_labels:
            if width != len(self.classnames):
                raise ValueError(
                    f"the classifier outputs {width} classes but dataset {self.name!r} has {len(self.classnames)} "
                    "and declares no class_subset or pooling mapping them to the reference classes")
            return logits
        needed = 1 + max(self.class_subset if self.class_subset is not None else (i for p in self.pooling for i in p))
        if width < needed:
            raise ValueError(f"dataset {self.name!r} maps its classes to reference class indices up to "
                             f"{needed - 1}, but the classifier outputs only {width} classes")
        if self.class_subset is not None:
            return logits[:, list(self.class_subset)]
        return np.stack([logits[:, list(group)].max(axis=1) for group in self.pooling], axis=1)

    def reference_rows(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which reference samples belong to this dataset's classes (a boolean mask) and their labels as
        this dataset's class indices (see :meth:`project_reference`)."""
        if not self.maps_labels:
            raise ValueError(f"dataset {self.name!r} has the reference's classes; there is no subset to restrict to")
        groups = [(i,) for i in self.class_subset] if self.class_subset is not None else self.pooling
        to_own = {ref: own for own, group in enumerate(groups) for ref in group}
        labels = np.asarray(labels)
        keep = np.array([int(y) in to_own for y in labels], dtype=bool)
        return keep, np.array([to_own[int(y)] for y in labels[keep]], dtype=np.int64)

    def project_reference(self, logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The reference dataset's samples of this dataset's classes, as this dataset scores them.

        Effective robustness on a class-subset shift compares it with reference accuracy *on the
        same classes* (Taori et al. 2020; imagenet-testbed's ``val-on-imagenet-r-classes``): keep the
        reference samples whose label is one of this dataset's (pooled) reference classes, project
        their logits with :meth:`project_logits` and relabel them with this dataset's class index.
        """
        keep, own = self.reference_rows(labels)
        return self.project_logits(np.asarray(logits)[keep]), own


@dataclass(frozen=True)
class Suite:
    name: str
    reference: str                 # dataset evaluated as the reference distribution (its "test" split)
    shifts: tuple[str, ...]        # datasets evaluated as distribution shifts ("test" splits)
    train: tuple[str, str] | None  # (dataset, split) used to fine-tune; None: an evaluation-only suite
    val: tuple[str, str] | None    # (dataset, split) held out for model selection; never test or shift data
    baseline: str | None = None    # name of the baseline fit that effective robustness uses
    description: str = ""
    # Per-method option defaults suited to this suite's scale (e.g. fewer epochs on a small dataset);
    # explicit flags and config keys override them. Shown by `robustbench-ft list suites`.
    method_defaults: dict[str, dict] = field(default_factory=dict, compare=False)
    defaults_source: str = ""      # where the method_defaults come from (a paper's recipe, a scaling rule)

    @property
    def eval_datasets(self) -> tuple[str, ...]:
        return (self.reference, *self.shifts)

    @property
    def data_splits(self) -> tuple[tuple[str, str], ...]:
        """Every (dataset, split) the suite reads: the evaluated test splits, train, and val if any."""
        needed = [(d, "test") for d in self.eval_datasets] + ([self.train] if self.train else []) + \
            ([self.val] if self.val else [])
        return tuple(dict.fromkeys(needed))
