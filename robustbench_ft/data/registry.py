"""Dataset and suite registries: each dataset or suite is one small declaration.

A ``DatasetSpec`` says what a dataset *is* (class names, prompt templates, the metric the field
reports for it, how its labels relate to the reference classes) and where its shards live; the
evaluation loop never special-cases a dataset. A ``Suite`` is a reference distribution plus its
shifts, the split used for fine-tuning, and the baseline its effective robustness is measured against.
"""
from __future__ import annotations

import difflib
import fcntl
import multiprocessing
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from robustbench_ft.data.shards import Manifest, ShardError, check_shard_files, verify_shards

if TYPE_CHECKING:
    from robustbench_ft.data.convert import ConvertOptions

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

    def project_reference(self, logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The reference dataset's samples of this dataset's classes, as this dataset scores them.

        Effective robustness on a class-subset shift compares it with reference accuracy *on the
        same classes* (Taori et al. 2020; imagenet-testbed's ``val-on-imagenet-r-classes``): keep the
        reference samples whose label is one of this dataset's (pooled) reference classes, project
        their logits with :meth:`project_logits` and relabel them with this dataset's class index.
        """
        if not self.maps_labels:
            raise ValueError(f"dataset {self.name!r} has the reference's classes; there is no subset to restrict to")
        groups = [(i,) for i in self.class_subset] if self.class_subset is not None else self.pooling
        to_own = {ref: own for own, group in enumerate(groups) for ref in group}
        labels = np.asarray(labels)
        keep = np.array([int(y) in to_own for y in labels], dtype=bool)
        own = np.array([to_own[int(y)] for y in labels[keep]], dtype=np.int64)
        return self.project_logits(np.asarray(logits)[keep]), own


@dataclass(frozen=True)
class Suite:
    name: str
    reference: str                 # dataset evaluated as the reference distribution (its "test" split)
    shifts: tuple[str, ...]        # datasets evaluated as distribution shifts ("test" splits)
    train: tuple[str, str]         # (dataset, split) used to fine-tune
    val: tuple[str, str] | None    # (dataset, split) held out for model selection; never test or shift data
    baseline: str | None = None    # name of the baseline fit that effective robustness uses
    description: str = ""
    # Per-method option defaults suited to this suite's scale (e.g. fewer epochs on a small dataset);
    # explicit flags and config keys override them. Shown by `robustbench-ft list suites`.
    method_defaults: dict[str, dict] = field(default_factory=dict, compare=False)

    @property
    def eval_datasets(self) -> tuple[str, ...]:
        return (self.reference, *self.shifts)

    @property
    def data_splits(self) -> tuple[tuple[str, str], ...]:
        """Every (dataset, split) the suite reads: the evaluated test splits, train, and val if any."""
        needed = [(d, "test") for d in self.eval_datasets] + [self.train] + ([self.val] if self.val else [])
        return tuple(dict.fromkeys(needed))


_DATASETS: dict[str, DatasetSpec] = {}
_SUITES: dict[str, Suite] = {}
_PLUGINS_LOADED = False


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in _DATASETS and _DATASETS[spec.name] is not spec:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _DATASETS[spec.name] = spec
    return spec


def register_suite(suite: Suite) -> Suite:
    if suite.name in _SUITES and _SUITES[suite.name] is not suite:
        raise ValueError(f"suite {suite.name!r} is already registered")
    _SUITES[suite.name] = suite
    return suite


def unknown_name_error(kind: str, name: str, valid: list[str]) -> KeyError:
    """A KeyError that lists the valid names and suggests the closest one."""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return KeyError(f"unknown {kind} {name!r}.{hint} Valid {kind}s: {', '.join(sorted(valid))}")


def _load_plugins() -> None:
    """Import built-in dataset modules and third-party ones registered under entry points."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    import robustbench_ft.data.demo  # noqa: F401  (registers the embedded demo suite)
    import robustbench_ft.data.imagenet  # noqa: F401  (ImageNet and its five shifts)
    import robustbench_ft.data.transfer  # noqa: F401  (CIFAR, DTD, Food-101, Cars, SUN397, Flowers, Caltech)
    import robustbench_ft.data.wilds  # noqa: F401  (iWildCam, FMoW)

    for group in ("robustbench_ft.datasets", "robustbench_ft.suites"):
        for ep in entry_points(group=group):
            ep.load()


def get_dataset(name: str) -> DatasetSpec:
    _load_plugins()
    if name not in _DATASETS:
        raise unknown_name_error("dataset", name, list(_DATASETS))
    return _DATASETS[name]


def get_suite(name: str) -> Suite:
    _load_plugins()
    if name not in _SUITES:
        raise unknown_name_error("suite", name, list(_SUITES))
    return _SUITES[name]


def list_datasets() -> list[DatasetSpec]:
    _load_plugins()
    return [_DATASETS[n] for n in sorted(_DATASETS)]


def list_suites() -> list[Suite]:
    _load_plugins()
    return [_SUITES[n] for n in sorted(_SUITES)]


@contextmanager
def _build_lock(target: Path):
    """An exclusive lock per dataset split, so concurrent runs do not build the same shards twice."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_dataset(spec: DatasetSpec, root: Path, split: str = "test", *, log=print, damaged_ok: bool = False) -> Path:
    """Return the shard directory of a split, building it first when missing or incomplete.

    A split counts as built only when its manifest exists and every shard matches it in size; a
    directory left by an interrupted build has no manifest (it is written last) and is rebuilt.
    Builds go to a temporary sibling directory that is renamed into place when complete.
    ``damaged_ok`` (``--on-bad-sample skip``): a split the harness cannot rebuild whose shards are
    damaged is returned anyway, with a warning, for a reader that skips what it cannot read.
    """
    target = spec.path(root, split)
    if _is_complete(target):
        return target
    builder = spec.builders.get(split)
    if builder is None:
        if target.exists():
            try:
                verify_shards(target, check_hashes=False)  # raises a ShardError naming what is wrong
            except ShardError as exc:
                if damaged_ok and (target / "manifest.json").is_file():
                    log(f"warning: {spec.name} ({split}) is damaged; unreadable samples will be skipped ({exc})")
                    return target
                if spec.converter is None:
                    raise
                raise ShardError(f"{exc}. For {spec.name}, rerun `robustbench-ft shard {spec.name} --src RAW "
                                 f"--split {split} --out {target}`: it keeps the shards that are intact") from None
        if spec.converter is not None:
            how = (f"Convert the official download with `robustbench-ft shard {spec.name} --src RAW --split {split} "
                   f"--out {target}`")
        else:
            how = (f"It declares no converter, so `robustbench-ft shard {spec.name}` cannot make it; convert a "
                   f"class-folder tree with `robustbench-ft shard imagefolder SRC {target}`")
        raise FileNotFoundError(f"dataset {spec.name!r} ({split}) is not built: no shards at {target}. {how} "
                                "(see datasets/README.md)")
    try:
        with _build_lock(target):
            if _is_complete(target):  # another process built it while we waited
                return target
            log(f"building {spec.name} ({split}) shards in {target} (first use; cached afterwards)")
            for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a killed build
                shutil.rmtree(stale, ignore_errors=True)
            partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
            builder(partial)
            verify_shards(partial, check_hashes=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial, target)
    except PermissionError as exc:
        raise PermissionError(f"cannot write dataset shards under {root} ({exc.strerror}): "
                              "choose a writable --data-root") from exc
    return target


def prepare_suite(suite: Suite, root: Path, *, processes: int = 1, log=print) -> list[str]:
    """Build, ``processes`` at a time, every split of ``suite`` the harness can build that is not built.

    Builders are CPU-bound Python (image encoding, tar writing), so splits are built in forked worker
    processes rather than threads; on the demo suite two processes halve the first run's data
    preparation. Splits without a builder are left to :func:`ensure_dataset`, which explains how to
    make them. Returns the ``dataset/split`` names that were built.
    """
    todo = [(dataset, split) for dataset, split in suite.data_splits
            if split in get_dataset(dataset).builders and not _is_complete(get_dataset(dataset).path(root, split))]
    names = [f"{dataset}/{split}" for dataset, split in todo]
    processes = min(processes, len(todo))
    if processes <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for dataset, split in todo:
            ensure_dataset(get_dataset(dataset), root, split, log=log)
        return names
    log(f"building {len(todo)} dataset splits under {root} in {processes} processes (first use; cached "
        f"afterwards): {', '.join(names)}")
    # fork, not spawn: children inherit the registry (plugins included) and skip re-importing torch
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        for _ in pool.imap_unordered(_build_split, [(dataset, split, str(root)) for dataset, split in todo]):
            pass
    return names


def _build_split(job: tuple[str, str, str]) -> None:
    dataset, split, root = job
    ensure_dataset(get_dataset(dataset), Path(root), split, log=silent)  # the parent announced the builds


def silent(message: str) -> None:
    """A log that says nothing (build workers of :func:`prepare_suite`; ranks other than 0 under torchrun)."""


def split_status(spec: DatasetSpec, root: Path, split: str) -> str:
    """Where one split stands under ``root``: "built", "incomplete" (shards without a manifest, e.g. a
    killed conversion: rerun it to resume), "on first use" (the harness builds it) or "missing"."""
    target = spec.path(root, split)
    if (target / "manifest.json").is_file():
        return "built"
    if target.is_dir() and any(target.iterdir()):
        return "incomplete"
    return "on first use" if split in spec.builders else "missing"


def suite_data_status(suite: Suite, root: Path) -> dict[str, list[str]]:
    """The suite's dataset splits (reference and shifts' test, train, val) grouped by :func:`split_status`."""
    status: dict[str, list[str]] = {state: [] for state in ("built", "incomplete", "on first use", "missing")}
    for dataset, split in suite.data_splits:
        status[split_status(get_dataset(dataset), root, split)].append(f"{dataset}/{split}")
    return {state: splits for state, splits in status.items() if splits}


def _is_complete(directory: Path) -> bool:
    """A manifest, and every shard it lists present with its recorded size (the cheap check: reading
    or hashing every shard on every run would cost minutes on ImageNet-scale sets; damage inside a
    shard is caught while it is read, and by ``robustbench-ft verify``)."""
    try:
        check_shard_files(Manifest.load(directory), directory, "size")
    except (ShardError, OSError, ValueError):
        return False
    return True
