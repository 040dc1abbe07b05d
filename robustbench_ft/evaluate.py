"""One pass over a dataset for many classifiers, with feature and logits caches.

Every batch is decoded and transformed once and fed to every candidate: an α sweep costs one
decode per image, not one per α. Candidates that share an image encoder object (e.g. linear heads
on a frozen encoder) also share its forward pass.

Two caches, both keyed by (content hash, dataset manifest hash, transform id), make a second
report, a re-scoring, or a resumed run cost no forward pass for what was already computed:

* logits, per classifier (its content hash);
* image features, per encoder (the hash of the encoder's weights), for :class:`Classifier`\\ s:
  a new linear head on a cached encoder (another α of a linear-probe WiSE-FT, a new probe) is
  scored from the features alone, without touching an image.

Changing the weights, a shard (hence the manifest hash) or the preprocessing (the transform id,
which also names the decode path) misses the cache. Arrays are ``.npy`` files read memory-mapped,
and a pass that writes to a cache streams its rows into them as it goes (:class:`RowStore`):
memory stays flat however many samples and candidates a pass has, and the metrics see the
exact float32 logits (float16 storage would flip near-tied argmaxes).

How images become model inputs is chosen per pass (:func:`eval_pipeline`): on CUDA, JPEG shards
are decoded on the GPU (:mod:`robustbench_ft.data.gpu_decode`); elsewhere open_clip's eval
transform is computed by the faster, equivalent CPU decoder (:mod:`robustbench_ft.data.eval_decode`);
a transform neither can map runs as given, on PIL images. See docs/performance.md.
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from robustbench_ft import distributed
from robustbench_ft.config import DECODE_MODES
from robustbench_ft.data.eval_decode import CPUDecoder, parse_eval_transform, transform_id
from robustbench_ft.data.loader import describe_skipped, make_loader
from robustbench_ft.data.shards import Manifest, ShardError
from robustbench_ft.models.classifier import Classifier, state_hash
from robustbench_ft.models.clip import autocast

__all__ = ["DECODE_MODES", "EvalPipeline", "LogitsCache", "Predictions", "RowStore", "eval_pipeline", "evaluate",
           "evaluate_cached", "transform_id"]

_HEAD_CHUNK = 8192  # rows of cached features scored per head call


@dataclass
class Predictions:
    """Logits of several classifiers on one dataset, rows in manifest order."""

    labels: np.ndarray                       # [N] int64
    logits: dict[str, np.ndarray]            # name -> [N, C] float32 (memory-mapped when streamed or cached)
    metas: list[dict] = field(default_factory=list)  # per-sample metadata (the shards' .json), [] if none kept
    seconds: float = 0.0
    # With on_bad="skip" and samples left out: what was skipped (loader.describe_skipped) and the
    # manifest indices of the rows that remain; None when every sample was read.
    skipped: dict | None = None
    rows: np.ndarray | None = None
    forward_passes: int = 0                  # encoder forward passes run (0: everything came from caches)

    def top1(self, name: str) -> float:
        return float((self.logits[name].argmax(axis=1) == self.labels).mean())


@dataclass(frozen=True)
class EvalPipeline:
    """How one pass turns shard samples into model inputs.

    ``loader_kwargs`` go to :func:`~robustbench_ft.data.loader.make_loader` (a PIL ``transform``, or
    a bytes ``decoder`` and its ``collate_fn``); ``prepare(images, indices)`` turns a batch's images
    into the float input on the device; ``transform_id`` names the pixels produced (cache keys).
    """

    name: str                       # "device", "fast" or "reference"
    transform_id: str
    loader_kwargs: dict[str, Any]
    prepare: Callable[[Any, torch.Tensor], torch.Tensor]


def eval_pipeline(transform: Callable, device: torch.device | str, image_format: str, decode: str = "auto", *,
                  draft_factor: float | None = None, on_bad: str = "error", keep_meta: bool = False,
                  directory: str | Path = "") -> EvalPipeline:
    """The decode path of a pass over ``image_format`` shards with ``transform`` on ``device``.

    ``decode``: "device" decodes JPEG batches on the device (nvJPEG on CUDA); "fast" computes
    open_clip's eval transform with :class:`~robustbench_ft.data.eval_decode.CPUDecoder` in the
    workers (normalising there for a CPU model, on the device otherwise); "reference" runs
    ``transform`` on PIL images;
    "auto" takes "device" on CUDA for JPEG shards, else "fast", else "reference", by what applies.
    ``draft_factor`` enables reduced-size JPEG decoding on the "fast" path (see eval_decode).
    The device path needs the error mode (``on_bad="error"``: skipped samples are tracked by workers).
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    device = torch.device(device)
    spec = parse_eval_transform(transform) if decode != "reference" else None
    if spec is None and decode in ("device", "fast"):
        raise ValueError(f"decode={decode!r} cannot map the transform {transform!r}: it needs open_clip's "
                         "Resize(int) -> CenterCrop -> RGB -> ToTensor -> Normalize; use decode='reference'")
    if spec is None:
        return EvalPipeline("reference", transform_id(transform), {"transform": transform},
                            lambda images, index: images.to(device, non_blocking=True))
    obstacle = ("the shards are not JPEG" if image_format != "jpg" else
                "on_bad='skip' needs the CPU path" if on_bad != "error" else
                "reduced-size (draft) decoding is CPU only" if draft_factor is not None else None)
    if decode == "device" and obstacle:
        raise ValueError(f"decode='device' is not possible here: {obstacle}; use decode='fast' or 'auto'")
    if decode == "device" or (decode == "auto" and device.type == "cuda" and obstacle is None):
        from robustbench_ft.data.gpu_decode import DeviceDecoder, collate_for, encoded_bytes

        decoder = DeviceDecoder(spec, device, directory)
        return EvalPipeline("device", decoder.id, {"decoder": encoded_bytes, "collate_fn": collate_for(keep_meta)},
                            lambda images, index: decoder(images, index.tolist()))
    spec = spec.with_draft(draft_factor)
    if device.type == "cpu":  # the workers normalise too: the main process is busy with the forward pass
        return EvalPipeline("fast", spec.id, {"decoder": CPUDecoder(spec, normalize=True)},
                            lambda images, index: images)
    return EvalPipeline("fast", spec.id, {"decoder": CPUDecoder(spec)},  # uint8 to the device, a quarter of the bytes
                        lambda images, index: spec.normalize(images.to(device, non_blocking=True)))


class RowStore:
    """[n, width] float32 arrays filled by rows in any order: in memory, or streamed to ``.npy`` files.

    With a ``directory``, rows are written to the file as they come (``os.pwrite``, no mapping) and
    the finished array is read back memory-mapped: nothing of it stays in process memory, so a pass
    over 4x the images or 11 candidates needs no more RAM than one. The files are temporary until a
    caller moves them into a cache (:meth:`LogitsCache.put`); :meth:`discard` removes the rest.
    """

    def __init__(self, n: int, directory: str | Path | None = None):
        self.n = n
        self.directory = None if directory is None else Path(directory)
        self._files: list[_Rows] = []

    def new(self, width: int) -> "_Rows":
        if self.directory is None:
            return _Rows(np.zeros((self.n, width), dtype=np.float32))
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f".rows-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp.npy"
        self._files.append(_Rows(path=path, shape=(self.n, width)))
        return self._files[-1]

    def discard(self) -> None:
        """Close and delete the files not moved into a cache (arrays already returned stay readable)."""
        for rows in self._files:
            rows.close()
            if rows.path is not None:
                rows.path.unlink(missing_ok=True)


class _Rows:
    def __init__(self, array: np.ndarray | None = None, *, path: Path | None = None,
                 shape: tuple[int, int] | None = None):
        self.array, self.path = array, path
        if path is not None:
            assert shape is not None
            with open(path, "wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                                          "fortran_order": False, "shape": shape})
                self.offset = f.tell()
                f.truncate(self.offset + shape[0] * shape[1] * 4)
            self.row_bytes = shape[1] * 4
            self.fd: int | None = os.open(path, os.O_WRONLY)

    def write(self, index: np.ndarray, rows: np.ndarray) -> None:
        """Put ``rows[i]`` at row ``index[i]``; consecutive indices go out in one write."""
        if self.array is not None:
            self.array[index] = rows
            return
        order = np.argsort(index, kind="stable")
        index, rows = index[order], np.ascontiguousarray(rows[order], dtype="<f4")
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(index)]):
            os.pwrite(self.fd, rows[start:stop].tobytes(), self.offset + int(index[start]) * self.row_bytes)

    def close(self) -> None:
        if self.array is None and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def result(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        self.close()
        return np.load(self.path, mmap_mode="c")


def content_keys(classifiers: Mapping[str, torch.nn.Module]) -> dict[str, str]:
    """A content hash per classifier, for the logits cache: for a :class:`Classifier`, of its encoder's
    hash and its head's, each encoder hashed once however many heads share it (11 α of a linear
    probe cost one encoder hash, not 11)."""
    encoders: dict[int, str] = {}
    keys = {}
    for name, clf in classifiers.items():
        if isinstance(clf, Classifier):
            if id(clf.visual) not in encoders:
                encoders[id(clf.visual)] = state_hash(clf.visual)
            keys[name] = hashlib.sha256(f"{encoders[id(clf.visual)]}:{state_hash(clf.head)}".encode()).hexdigest()
        else:
            keys[name] = state_hash(clf)
    return keys


def _encoder_groups(classifiers: Mapping[str, torch.nn.Module]) -> list[list[str]]:
    """Names grouped by shared encoder object (a Classifier's ``visual``; any other module alone)."""
    groups: dict[int, list[str]] = {}
    for name, clf in classifiers.items():
        groups.setdefault(id(clf.visual if isinstance(clf, Classifier) else clf), []).append(name)
    return list(groups.values())


@torch.no_grad()
def evaluate(classifiers: Mapping[str, torch.nn.Module], directory: str | Path, transform: Callable, *,
             batch_size: int = 256, workers: int = 0, device: torch.device | str = "cpu",
             precision: str = "fp32", progress: bool = True, desc: str = "evaluating",
             keep_meta: bool = False, num_outputs: int | None = None, on_bad: str = "error",
             verify: str = "hash", decode: str = "auto", draft_factor: float | None = None,
             features: "LogitsCache | None" = None, store: str | Path | None = None,
             compile_model: bool = False) -> Predictions:
    """Logits of every classifier on the shard set at ``directory`` in one pass over its images.

    A :class:`Classifier` is run as ``head(features(images))`` so that classifiers sharing an
    encoder share its forward pass; any other module (e.g. a baseline-zoo network) as ``model(images)``.
    ``num_outputs`` is the width every classifier must output: the dataset's class count by default,
    the reference's for a shift whose spec maps reference logits onto its classes (ImageNet-R, ObjectNet).

    ``verify`` checks the shard files against the manifest before the pass ("hash" by default: a
    replaced or bit-rotted shard is refused by name rather than scored, and cached under the
    manifest's hash). ``on_bad="skip"`` leaves unreadable samples out instead of failing (see
    :class:`~robustbench_ft.data.loader.ShardDataset`): the result then holds only the samples read,
    so every metric is over those, and says what was skipped (``Predictions.skipped``).

    ``decode`` and ``draft_factor`` choose the decode path (:func:`eval_pipeline`). ``features``:
    a cache of image features; encoders found in it are not run (their heads score the cached
    features), the others' features are stored after a complete pass. ``store``: a directory to
    stream logits into (see :class:`RowStore`; the caller removes or adopts the files); None keeps
    them in memory. ``compile_model``: ``torch.compile`` the encoders first (pays off on long GPU passes).

    Under torchrun each rank reads its share of the shards and the logits are summed back together
    (ranks fill disjoint rows), so every rank returns the full predictions of a one-process pass.
    """
    if not classifiers:
        raise ValueError("evaluate() needs at least one classifier")
    device = torch.device(device)
    manifest = Manifest.load(directory)
    n = manifest.num_samples
    width = len(manifest.classes) if num_outputs is None else num_outputs
    world = distributed.world()
    pipeline = eval_pipeline(transform, device, manifest.image_format, decode, draft_factor=draft_factor,
                             on_bad=on_bad, keep_meta=keep_meta, directory=directory)
    rowstore = RowStore(n, None if world.distributed else store)
    feature_cache = None if world.distributed else features
    feature_store = RowStore(n, None if feature_cache is None else feature_cache.root)  # moved into it when done
    start = time.perf_counter()
    try:
        rows = {name: rowstore.new(width) for name in classifiers}
        labels = np.full(n, -1, dtype=np.int64)
        metas: list[dict] = [{} for _ in range(n)] if keep_meta else []
        for clf in classifiers.values():
            clf.eval()
        groups = _encoder_groups(classifiers)
        to_cache: dict[int, Path] = {}  # group -> features cache key, for encoders whose features are stored
        if feature_cache is not None:
            manifest_hash = manifest.content_hash()
            for g, names in enumerate(groups):
                first = classifiers[names[0]]
                if not isinstance(first, Classifier):
                    continue
                key = feature_cache.path(state_hash(first.visual), manifest_hash, pipeline.transform_id)
                hit = feature_cache.get(key)
                if hit is None:
                    to_cache[g] = key
                    continue
                feats, cached_labels = hit
                for begin in range(0, n, _HEAD_CHUNK):  # a head on cached features: no image is touched
                    chunk = torch.from_numpy(np.asarray(feats[begin:begin + _HEAD_CHUNK])).to(device)
                    with autocast(device, precision):
                        for name in names:
                            out = classifiers[name].head(chunk)
                            _check_width(name, out, width, directory)
                            rows[name].write(np.arange(begin, begin + len(chunk)), out.float().cpu().numpy())
                labels = np.array(cached_labels)
                groups[g] = []
        groups = [names for names in groups if names]
        feature_rows: dict[int, _Rows] = {}
        forward_passes = 0
        if groups or keep_meta:
            labels[:] = -1  # the pass decides which samples were read
            forward = [_forward_fn(classifiers[names[0]], compile_model) for names in groups]
            loader = make_loader(directory, pipeline.loader_kwargs.get("transform"), batch_size, num_workers=workers,
                                 rank=world.rank, world_size=world.world_size, with_index=True, with_meta=keep_meta,
                                 verify=verify, on_bad=on_bad,
                                 **{k: v for k, v in pipeline.loader_kwargs.items() if k != "transform"})
            seen = 0
            with tqdm(total=len(loader.dataset), desc=desc, disable=not progress, unit="img",
                      dynamic_ncols=True) as bar:
                for batch in loader:
                    targets, index = batch[1], batch[2]
                    idx = index.numpy()
                    images = pipeline.prepare(batch[0], index) if groups else None
                    with autocast(device, precision):
                        for g, names in enumerate(groups):
                            feats = forward[g](images)
                            if g in to_cache:
                                if g not in feature_rows:
                                    feature_rows[g] = feature_store.new(feats.shape[1])
                                feature_rows[g].write(idx, feats.float().cpu().numpy())
                            for name in names:
                                clf = classifiers[name]
                                out = clf.head(feats) if isinstance(clf, Classifier) else feats
                                _check_width(name, out, width, directory)
                                rows[name].write(idx, out.float().cpu().numpy())
                    labels[idx] = targets.numpy()
                    if keep_meta:
                        for i, meta in zip(idx, batch[4]):
                            metas[i] = meta
                    seen += len(idx)
                    bar.update(len(idx))
            forward_passes = len(groups)
            if world.distributed:  # assemble the ranks' disjoint rows on every rank
                if keep_meta:
                    for part in distributed.all_gather_objects({int(i): metas[i] for i in np.flatnonzero(labels >= 0)}):
                        for i, meta in part.items():
                            metas[i] = meta
                labels = distributed.all_reduce_sum(labels + 1) - 1
                seen = int(distributed.all_reduce_sum(np.array([seen]))[0])
        else:
            seen = n
        logits = {name: r.result() for name, r in rows.items()}
        if world.distributed:
            logits = {name: distributed.all_reduce_sum(v) for name, v in logits.items()}
        missing = np.flatnonzero(labels < 0)
        if seen != n - len(missing) or (len(missing) and on_bad == "error"):
            raise RuntimeError(f"{directory}: read {seen} samples but the manifest lists {n}")
        if len(missing) == n:
            raise ShardError(f"{directory}: no sample could be read (all {n} skipped); rebuild the shard set")
        if not len(missing) and feature_cache is not None:  # only complete passes are cached
            for g, key in to_cache.items():
                if g in feature_rows:
                    feature_cache.put(key, feature_rows[g].result(), labels)
    except BaseException:
        rowstore.discard()
        raise
    finally:
        feature_store.discard()  # what was not moved into the feature cache
    if not len(missing):
        return Predictions(labels, logits, metas, time.perf_counter() - start, forward_passes=forward_passes)
    kept = np.flatnonzero(labels >= 0)
    preds = Predictions(labels[kept], {name: np.asarray(v[kept]) for name, v in logits.items()},
                        [metas[i] for i in kept] if keep_meta else [], time.perf_counter() - start,
                        describe_skipped(directory, missing, verify, pipeline.loader_kwargs.get("decoder")), kept,
                        forward_passes)
    rowstore.discard()  # the partial rows were copied out; they are never cached as the dataset's
    return preds


def _forward_fn(clf: torch.nn.Module, compile_model: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The shared part of an encoder group: a Classifier's features, or a whole other module."""
    fn = clf.features if isinstance(clf, Classifier) else clf
    return torch.compile(fn) if compile_model else fn


def _check_width(name: str, out: torch.Tensor, width: int, directory: str | Path) -> None:
    if out.shape[1] != width:
        raise ValueError(f"{name} outputs {out.shape[1]} classes, but {width} are expected for {directory}")


class LogitsCache:
    """Arrays on disk, one ``.npy`` per (classifier or encoder, dataset, transform), read memory-mapped.

    Each entry is ``KEY.npy`` (rows in manifest order) and ``KEY.labels.npy``; the array file is moved
    into place last (atomically), so a present array means a complete entry. Used for logits
    (``<cache_dir>/logits``) and image features (``<cache_dir>/features``).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, classifier_hash: str, manifest_hash: str, transform: str) -> Path:
        return self.root / f"{classifier_hash[:20]}-{manifest_hash[:20]}-{transform}.npy"

    @staticmethod
    def labels_path(key: Path) -> Path:
        return key.with_suffix(".labels.npy")

    def get(self, key: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """(array memory-mapped copy-on-write, labels), or None when absent or damaged (then recompute)."""
        if not key.is_file():
            return None
        try:
            array = np.load(key, mmap_mode="c")
            labels = np.load(self.labels_path(key))
        except (OSError, ValueError):
            return None
        if array.ndim != 2 or labels.shape != (array.shape[0],):
            return None
        return array, labels

    def put(self, key: Path, array: np.ndarray, labels: np.ndarray) -> None:
        """Store ``array`` and ``labels`` under ``key`` (rank 0 only under torchrun: every rank holds the same rows).

        An array streamed by :class:`RowStore` into this cache's directory is moved into place, not copied.
        """
        if not distributed.world().is_main:
            return
        streamed = Path(array.filename) if isinstance(array, np.memmap) and array.filename else None
        if (streamed is not None and streamed.name.startswith(".rows-") and streamed.is_file()
                and streamed.parent.resolve() == self.root.resolve()):
            self._install(key, streamed, labels)
            return
        tmp = self._tmp(key)
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(array))
            self._install(key, tmp, labels)
        finally:
            tmp.unlink(missing_ok=True)

    def _tmp(self, key: Path) -> Path:
        # unique per writer: two runs caching the same entry at once must not share a temporary file
        key.parent.mkdir(parents=True, exist_ok=True)
        return key.with_name(f".{key.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npy")

    def _install(self, key: Path, array_file: Path, labels: np.ndarray) -> None:
        tmp = self._tmp(key)
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(labels, dtype=np.int64))
            tmp.replace(self.labels_path(key))
        finally:
            tmp.unlink(missing_ok=True)
        os.replace(array_file, key)


def evaluate_cached(classifiers: Mapping[str, Classifier], directory: str | Path, transform: Callable,
                    cache: LogitsCache | None, **kwargs) -> Predictions:
    """:func:`evaluate`, skipping the classifiers whose logits on this dataset are already cached.

    Fresh logits stream into the cache directory and are moved into the cache when the pass is
    complete. Per-sample metadata is not cached, so ``keep_meta=True`` always evaluates.
    ``kwargs`` go to :func:`evaluate` (``features=`` adds the feature cache).
    """
    if cache is None or kwargs.get("keep_meta"):
        return evaluate(classifiers, directory, transform, **kwargs)
    manifest = Manifest.load(directory)
    manifest_hash = manifest.content_hash()
    tid = eval_pipeline(transform, kwargs.get("device", "cpu"), manifest.image_format, kwargs.get("decode", "auto"),
                        draft_factor=kwargs.get("draft_factor"), on_bad=kwargs.get("on_bad", "error")).transform_id
    keys = {name: cache.path(key, manifest_hash, tid) for name, key in content_keys(classifiers).items()}
    cached = {name: cache.get(key) for name, key in keys.items()}
    todo = {name: classifiers[name] for name, hit in cached.items() if hit is None}
    fresh = evaluate(todo, directory, transform, store=cache.root, **kwargs) if todo else None
    labels = fresh.labels if fresh else next(iter(cached.values()))[1]
    rows = fresh.rows if fresh else None  # samples were skipped: score every classifier on the same ones
    out = {}
    for name in classifiers:
        if fresh is not None and name in fresh.logits:
            if rows is None:  # logits of a partial pass are never cached as the dataset's
                cache.put(keys[name], fresh.logits[name], fresh.labels)
            out[name] = fresh.logits[name]
        else:
            out[name] = cached[name][0] if rows is None else cached[name][0][rows]
    return Predictions(labels, out, [], fresh.seconds if fresh else 0.0, fresh.skipped if fresh else None, rows,
                       fresh.forward_passes if fresh else 0)
