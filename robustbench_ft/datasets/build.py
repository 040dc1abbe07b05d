"""Splits built on first use: a dataset the harness can make itself (the demo) is built into a temporary
directory renamed into place when complete, one process at a time per split; a user-converted one is
checked and, when missing, explained.
"""
from __future__ import annotations

import fcntl
import multiprocessing
import os
import shutil
from collections.abc import Collection, Mapping
from contextlib import contextmanager
from pathlib import Path

from robustbench_ft.datasets.registry import get_dataset
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.shards import urls
from robustbench_ft.shards.manifest import Manifest, ShardError
from robustbench_ft.shards.urls import load_manifest
from robustbench_ft.shards.verify import check_shard_files, verify_shards
from robustbench_ft.util import silent


@contextmanager
def _build_lock(target: Path):
    """An exclusive lock per dataset split, so concurrent runs do not build the same shards twice.

    The lock file is opened without following a symlink and without truncating: a link planted at its
    name cannot make the harness empty the file it points to."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise ShardError(f"cannot open the build lock {lock} ({exc.strerror}); it must be a plain file (remove it "
                         "if it is a link)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def ensure_dataset(spec: DatasetSpec, root: Path, split: str = "test", *, log=print, damaged_ok: bool = False) -> Path:
    """Return the shard directory of a split, building it first when missing or incomplete.

    A split counts as built only when its manifest exists and every shard matches it in size; a
    directory left by an interrupted build has no manifest (it is written last) and is rebuilt.
    Builds go to a temporary sibling directory that is renamed into place when complete.
    ``damaged_ok`` (``--on-bad-sample skip``): a split the harness cannot rebuild whose shards are
    damaged is returned anyway, with a warning, for a reader that skips what it cannot read.
    The shard set's class list must be the dataset's, in order (:func:`check_class_list`).
    """
    target = _locate(spec, root, split, log, damaged_ok)
    check_class_list(spec, Manifest.load(target), target)
    return target


def check_class_list(spec: DatasetSpec, manifest: Manifest, directory: Path) -> None:
    """Refuse a shard set whose classes are not the dataset's, in the same order: its labels would be
    scored against the wrong names (a folder tree converted in alphabetical order scores 10 % where
    98 % is right). Names the first difference and how to fix it."""
    expected, found = tuple(spec.shard_classes), tuple(manifest.classes)
    if expected == found:
        return
    if len(expected) != len(found):
        detail = f"it has {len(found)} classes, {spec.name!r} has {len(expected)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(expected, found)) if a != b)
        detail = f"class {i} is {found[i][:60]!r} there but {expected[i][:60]!r} in {spec.name!r}"
    fix = (f"rebuild it with `robustbench-ft shard imagefolder SRC {directory} --dataset {spec.name}`, which orders "
           f"the class folders as the dataset declares" if spec.converter is None else
           f"rebuild it with `robustbench-ft shard {spec.name} --src RAW --out {directory}`")
    raise ShardError(f"{directory}: the shard set's classes are not those of dataset {spec.name!r} ({detail}); {fix}")


def data_identity(suite: Suite, root: Path, streamed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Content hash of every built split the suite reads (``"dataset/split"`` -> manifest hash): part of
    the key of checkpoints and records, so that a changed shard set is never served old ones.
    ``streamed`` (dataset -> URL of its test split) names the sets whose manifest is fetched instead."""
    out = {}
    for dataset, split in suite.data_splits:
        if split == "test" and dataset in (streamed or {}):
            out[f"{dataset}/{split}"] = load_manifest(streamed[dataset]).content_hash()
            continue
        directory = get_dataset(dataset).path(root, split)
        if (directory / "manifest.json").is_file():
            out[f"{dataset}/{split}"] = Manifest.load(directory).content_hash()
    return out


def streamed_locations(suite: Suite, data_root: str, data_urls: Mapping[str, str]) -> dict[str, str]:
    """dataset -> URL for each evaluated dataset of ``suite`` whose test split is streamed: the one
    ``data_urls`` names, else ``<data_root>/<dataset>/test`` when ``data_root`` is a URL."""
    from robustbench_ft.datasets.registry import list_datasets

    known = {d.name for d in list_datasets()}
    unknown = sorted(set(data_urls) - known)
    if unknown:
        raise ValueError(f"data_urls names unknown dataset(s) {unknown}; its keys are dataset names "
                         f"(`robustbench-ft list datasets`), each mapped to the URL of its test split")
    out = {}
    for name in suite.eval_datasets:
        url = data_urls.get(name) or (str(urls.join(data_root, name, "test")) if urls.is_url(data_root) else None)
        if url is not None:
            urls.check_stream_location(url, f"data_urls[{name!r}]" if name in data_urls else "data_root")
            out[name] = url
    return out


def ensure_streamed(spec: DatasetSpec, url: str) -> str:
    """The URL of a streamed test split, once its manifest is fetched and its class list checked."""
    check_class_list(spec, load_manifest(url), url)  # type: ignore[arg-type]
    return url


def _locate(spec: DatasetSpec, root: Path, split: str, log, damaged_ok: bool) -> Path:
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


def prepare_suite(suite: Suite, root: Path, *, processes: int = 1, log=print,
                  streamed: Collection[str] = ()) -> list[str]:
    """Build, ``processes`` at a time, every split of ``suite`` the harness can build that is not built.

    Builders are CPU-bound Python (image encoding, tar writing), so splits are built in forked worker
    processes rather than threads; on the demo suite two processes halve the first run's data
    preparation. Splits without a builder are left to :func:`ensure_dataset`, which explains how to
    make them; so are the test splits of ``streamed`` datasets (read from URLs). Returns the
    ``dataset/split`` names that were built.
    """
    todo = [(dataset, split) for dataset, split in suite.data_splits
            if split in get_dataset(dataset).builders and not (split == "test" and dataset in streamed)
            and not _is_complete(get_dataset(dataset).path(root, split))]
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
