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
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from robustbench_ft import distributed
from robustbench_ft.evaluation.cache import ArrayCache
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.evaluation.pipeline import EvalPipeline, eval_pipeline
from robustbench_ft.evaluation.rows import Rows, RowStore
from robustbench_ft.loading.loader import make_loader
from robustbench_ft.loading.shard_dataset import describe_skipped, worker_errors
from robustbench_ft.models.classifier import Classifier, state_hash
from robustbench_ft.models.clip import autocast
from robustbench_ft.shards.manifest import Manifest, ShardError
from robustbench_ft.shards.urls import as_location, load_manifest

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


def output_width(model: torch.nn.Module, default: int) -> int:
    """How many columns ``model`` outputs: its ``output_width`` where it declares one (a combination of
    several classifiers outputs all of their logits), else ``default`` (one per reference class)."""
    width = getattr(model, "output_width", None)
    return int(width) if width is not None else default


def _encoder_groups(classifiers: Mapping[str, torch.nn.Module]) -> list[list[str]]:
    """Names grouped by shared encoder object (a Classifier's ``visual``; any other module alone)."""
    groups: dict[int, list[str]] = {}
    for name, clf in classifiers.items():
        groups.setdefault(id(clf.visual if isinstance(clf, Classifier) else clf), []).append(name)
    return list(groups.values())


@dataclass
class _Pass:
    """The state of one evaluation pass: where each classifier's rows go, the labels and metadata read."""

    classifiers: Mapping[str, torch.nn.Module]
    directory: Path | str             # a local directory, or the URL of a streamed set
    options: EvalOptions
    pipeline: EvalPipeline
    rows: dict[str, Rows]
    widths: dict[str, int]
    labels: np.ndarray
    metas: list[dict]
    forward_passes: int = 0

    def write(self, name: str, index: np.ndarray, out: torch.Tensor) -> None:
        if out.shape[1] != self.widths[name]:
            raise ValueError(f"{name} outputs {out.shape[1]} columns, but {self.widths[name]} are expected for "
                             f"{self.directory}")
        self.rows[name].write(index, out.float().cpu().numpy())


@torch.no_grad()
def evaluate(classifiers: Mapping[str, torch.nn.Module], directory: str | Path, transform: Callable,
             options: EvalOptions = EvalOptions(), *, desc: str = "evaluating", keep_meta: bool = False,
             num_outputs: int | None = None, features: ArrayCache | None = None,
             store: str | Path | None = None) -> Predictions:
    """Logits of every classifier on the shard set at ``directory`` in one pass over its images.

    ``directory`` is a local shard directory or the http(s):// / file:// URL of one, which is streamed
    with every shard checked against the manifest's sha256 as it arrives: a pass that meets a shard
    that does not match (or a connection that breaks) raises, naming it, and nothing of it is cached.

    A :class:`Classifier` is run as ``head(features(images))`` so that classifiers sharing an
    encoder share its forward pass; any other module (e.g. a baseline-zoo network, a combination of
    classifiers) as ``model(images)``. ``num_outputs`` is the width every classifier must output
    unless it declares its own ``output_width``: the dataset's class count by default, the
    reference's for a shift whose spec maps reference logits onto its classes (ImageNet-R, ObjectNet).
    ``options`` (:class:`EvalOptions`): batch size, workers, device, precision, shard verification,
    unreadable samples, decode path.

    ``features``: a cache of image features; encoders found in it are not run (their heads score the
    cached features), the others' features are stored after a complete pass. ``store``: a directory
    to stream logits into (see :class:`RowStore`; the caller removes or adopts the files); None keeps
    them in memory. With ``options.on_bad="skip"`` the result holds only the samples read and says
    what was skipped (``Predictions.skipped``).

    Under torchrun each rank reads its share of the shards and the logits are summed back together
    (ranks fill disjoint rows), so every rank returns the full predictions of a one-process pass.
    """
    if not classifiers:
        raise ValueError("evaluate() needs at least one classifier")
    directory = as_location(directory)
    manifest = load_manifest(directory)
    n = manifest.num_samples
    default_width = len(manifest.classes) if num_outputs is None else num_outputs
    world = distributed.world()
    pipeline = eval_pipeline(transform, options.torch_device, manifest.image_format, options.decode,
                             draft_factor=options.draft_factor, on_bad=options.on_bad, keep_meta=keep_meta,
                             directory=directory)
    rowstore = RowStore(n, None if world.distributed else store)
    feature_cache = None if world.distributed else features
    feature_store = RowStore(n, None if feature_cache is None else feature_cache.root)  # moved into it when done
    start = time.perf_counter()
    try:
        state = _Pass(classifiers, directory, options, pipeline, {name: None for name in classifiers},  # type: ignore
                      {name: output_width(clf, default_width) for name, clf in classifiers.items()},
                      np.full(n, -1, dtype=np.int64), [{} for _ in range(n)] if keep_meta else [])
        state.rows = {name: rowstore.new(state.widths[name]) for name in classifiers}
        for clf in classifiers.values():
            clf.eval()
        groups = _encoder_groups(classifiers)
        to_cache: dict[int, Path] = {}  # group -> features cache key, for encoders whose features are stored
        if feature_cache is not None:
            groups, to_cache = _heads_on_cached_features(state, groups, feature_cache, manifest)
        feature_rows: dict[int, Rows] = {}
        seen = n
        if groups or keep_meta:
            seen = _stream(state, groups, to_cache, feature_rows, feature_store, desc)
        logits = {name: r.result() for name, r in state.rows.items()}
        if world.distributed:
            logits = {name: distributed.all_reduce_sum(v) for name, v in logits.items()}
        missing = np.flatnonzero(state.labels < 0)
        if seen != n - len(missing) or (len(missing) and options.on_bad == "error"):
            raise RuntimeError(f"{directory}: read {seen} samples but the manifest lists {n}")
        if len(missing) == n:
            raise ShardError(f"{directory}: no sample could be read (all {n} skipped); rebuild the shard set")
        if not len(missing) and feature_cache is not None:  # only complete passes are cached
            for g, key in to_cache.items():
                if g in feature_rows:
                    feature_cache.put(key, feature_rows[g].result(), state.labels)
    except BaseException:
        rowstore.discard()
        raise
    finally:
        feature_store.discard()  # what was not moved into the feature cache
    seconds = time.perf_counter() - start
    if not len(missing):
        return Predictions(state.labels, logits, state.metas, seconds, forward_passes=state.forward_passes)
    kept = np.flatnonzero(state.labels >= 0)
    preds = Predictions(state.labels[kept], {name: np.asarray(v[kept]) for name, v in logits.items()},
                        [state.metas[i] for i in kept] if keep_meta else [], seconds,
                        describe_skipped(directory, missing, options.verify, pipeline.loader_kwargs.get("decoder")),
                        kept, state.forward_passes)
    rowstore.discard()  # the partial rows were copied out; they are never cached as the dataset's
    return preds


def _heads_on_cached_features(state: _Pass, groups: list[list[str]], cache: ArrayCache,
                              manifest: Manifest) -> tuple[list[list[str]], dict[int, Path]]:
    """Score the heads of every encoder whose features are cached, without touching an image.

    Returns the groups still to run and, for those that are Classifiers, where their features go."""
    device, n = state.options.torch_device, manifest.num_samples
    manifest_hash = manifest.content_hash()
    remaining, to_cache = [], {}
    for names in groups:
        first = state.classifiers[names[0]]
        if not isinstance(first, Classifier):
            remaining.append(names)
            continue
        key = cache.path(state_hash(first.visual), manifest_hash, state.pipeline.transform_id)
        hit = cache.get(key, rows=n)
        if hit is None:
            to_cache[len(remaining)] = key
            remaining.append(names)
            continue
        feats, cached_labels = hit
        for begin in range(0, n, _HEAD_CHUNK):
            chunk = torch.from_numpy(np.asarray(feats[begin:begin + _HEAD_CHUNK])).to(device)
            with autocast(device, state.options.precision):
                for name in names:
                    state.write(name, np.arange(begin, begin + len(chunk)), state.classifiers[name].head(chunk))
        state.labels[:] = cached_labels
    return remaining, to_cache


def _stream(state: _Pass, groups: list[list[str]], to_cache: dict[int, Path], feature_rows: dict[int, Rows],
            feature_store: RowStore, desc: str) -> int:
    """Read the shards once and run every encoder group on each batch; returns the samples read."""
    options, world = state.options, distributed.world()
    device = options.torch_device
    state.labels[:] = -1  # the pass decides which samples were read
    keep_meta = bool(state.metas)
    forward = [_forward_fn(state.classifiers[names[0]], options.compile_model) for names in groups]
    loader = make_loader(state.directory, state.pipeline.loader_kwargs.get("transform"), options.batch_size,
                         num_workers=options.workers, rank=world.rank, world_size=world.world_size, with_index=True,
                         with_meta=keep_meta, verify=options.verify, on_bad=options.on_bad,
                         **{k: v for k, v in state.pipeline.loader_kwargs.items() if k != "transform"})
    seen = 0
    with tqdm(total=len(loader.dataset), desc=desc, disable=not options.progress, unit="img",
              dynamic_ncols=True) as bar, worker_errors():
        for batch in loader:
            targets, index = batch[1], batch[2]
            idx = index.numpy()
            images = state.pipeline.prepare(batch[0], index) if groups else None
            with autocast(device, options.precision):
                for g, names in enumerate(groups):
                    feats = forward[g](images)
                    if g in to_cache:
                        if g not in feature_rows:
                            feature_rows[g] = feature_store.new(feats.shape[1])
                        feature_rows[g].write(idx, feats.float().cpu().numpy())
                    for name in names:
                        clf = state.classifiers[name]
                        state.write(name, idx, clf.head(feats) if isinstance(clf, Classifier) else feats)
            state.labels[idx] = targets.numpy()
            if keep_meta:
                for i, meta in zip(idx, batch[4]):
                    state.metas[i] = meta
            seen += len(idx)
            bar.update(len(idx))
    state.forward_passes = len(groups)
    if world.distributed:  # assemble the ranks' disjoint rows on every rank
        if keep_meta:
            for part in distributed.all_gather_objects({int(i): state.metas[i]
                                                        for i in np.flatnonzero(state.labels >= 0)}):
                for i, meta in part.items():
                    state.metas[i] = meta
        state.labels[:] = distributed.all_reduce_sum(state.labels + 1) - 1
        seen = int(distributed.all_reduce_sum(np.array([seen]))[0])
    return seen


def _forward_fn(clf: torch.nn.Module, compile_model: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The shared part of an encoder group: a Classifier's features, or a whole other module."""
    fn = clf.features if isinstance(clf, Classifier) else clf
    return torch.compile(fn) if compile_model else fn


def evaluate_cached(classifiers: Mapping[str, torch.nn.Module], directory: str | Path, transform: Callable,
                    cache: ArrayCache | None, options: EvalOptions = EvalOptions(), **kwargs: Any) -> Predictions:
    """:func:`evaluate`, skipping the classifiers whose logits on this dataset are already cached.

    Fresh logits stream into the cache directory and are moved into the cache when the pass is
    complete. Per-sample metadata is not cached, so ``keep_meta=True`` always evaluates.
    ``kwargs`` go to :func:`evaluate` (``features=`` adds the feature cache).
    """
    if cache is None or kwargs.get("keep_meta"):
        return evaluate(classifiers, directory, transform, options, **kwargs)
    manifest = load_manifest(directory)
    manifest_hash = manifest.content_hash()
    tid = eval_pipeline(transform, options.torch_device, manifest.image_format, options.decode,
                        draft_factor=options.draft_factor, on_bad=options.on_bad).transform_id
    keys = {name: cache.path(key, manifest_hash, tid) for name, key in content_keys(classifiers).items()}
    cached = {name: cache.get(key, rows=manifest.num_samples) for name, key in keys.items()}
    todo = {name: classifiers[name] for name, hit in cached.items() if hit is None}
    fresh = evaluate(todo, directory, transform, options, store=cache.root, **kwargs) if todo else None
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
