"""Dataset and suite registries: each dataset or suite is one small declaration.

A ``DatasetSpec`` says what a dataset *is* (class names, prompt templates, the metric the field
reports for it, how its labels relate to the reference classes) and where its shards live; the
evaluation loop never special-cases a dataset. A ``Suite`` is a reference distribution plus its
shifts, the split used for fine-tuning, and the baseline its effective robustness is measured against.
"""
from __future__ import annotations

import difflib
import fcntl
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from robustbench_ft.data.shards import Manifest, ShardError, verify_shards

BuildFn = Callable[[Path], Manifest]
"""Builds one split's shards into the given directory (for datasets the harness can make itself)."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    metric: str = "top1"
    description: str = ""
    source: str = ""
    # split name -> builder; datasets users bring (ImageNet, WILDS) have none and are converted with `shard`.
    builders: dict[str, BuildFn] = field(default_factory=dict, compare=False, repr=False)
    splits: tuple[str, ...] = ("test",)

    def path(self, root: Path, split: str = "test") -> Path:
        """Directory holding the shards of one split: ``<root>/<name>/<split>``."""
        if split not in self.splits:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; it has {list(self.splits)}")
        return Path(root) / self.name / split


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


def ensure_dataset(spec: DatasetSpec, root: Path, split: str = "test", *, log=print) -> Path:
    """Return the shard directory of a split, building it first when missing or incomplete.

    A split counts as built only when its manifest exists and every shard matches it in size; a
    directory left by an interrupted build has no manifest (it is written last) and is rebuilt.
    Builds go to a temporary sibling directory that is renamed into place when complete.
    """
    target = spec.path(root, split)
    if _is_complete(target):
        return target
    builder = spec.builders.get(split)
    if builder is None:
        if target.exists():
            verify_shards(target, check_hashes=False)  # raises a ShardError naming what is wrong
        raise FileNotFoundError(
            f"dataset {spec.name!r} ({split}) is not built: no shards at {target}. Convert the official download "
            f"with `robustbench-ft shard {spec.name} --src RAW --out {target}` (see datasets/README.md)"
        )
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


def _is_complete(directory: Path) -> bool:
    if not (directory / "manifest.json").is_file():
        return False
    try:
        verify_shards(directory, check_hashes=False)
    except ShardError:
        return False
    return True
