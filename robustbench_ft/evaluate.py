"""One pass over a dataset for many classifiers, with a logits cache.

Every batch is decoded and transformed once and fed to every candidate: an α sweep costs one
decode per image, not one per α. Candidates that share an image encoder object (e.g. linear heads
on a frozen encoder) also share its forward pass. Logits are cached on disk keyed by
(classifier content hash, dataset manifest hash, transform), so re-scoring or re-reporting a run, or
resuming an interrupted one, costs no forward pass for what was already computed.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from robustbench_ft.data.loader import make_loader
from robustbench_ft.data.shards import Manifest
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.models.clip import autocast


@dataclass
class Predictions:
    """Logits of several classifiers on one dataset, rows in manifest order."""

    labels: np.ndarray                       # [N] int64
    logits: dict[str, np.ndarray]            # name -> [N, C] float32
    metas: list[dict] = field(default_factory=list)  # per-sample metadata (the shards' .json), [] if none kept
    seconds: float = 0.0

    def top1(self, name: str) -> float:
        return float((self.logits[name].argmax(axis=1) == self.labels).mean())


def transform_id(transform: Callable) -> str:
    """A short, stable identifier of a preprocessing pipeline (its repr lists sizes, interpolation, mean/std)."""
    return hashlib.sha256(repr(transform).encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate(classifiers: Mapping[str, torch.nn.Module], directory: str | Path, transform: Callable, *,
             batch_size: int = 256, workers: int = 0, device: torch.device | str = "cpu",
             precision: str = "fp32", progress: bool = True, desc: str = "evaluating",
             keep_meta: bool = False, num_outputs: int | None = None) -> Predictions:
    """Logits of every classifier on the shard set at ``directory`` in one pass over its images.

    A :class:`Classifier` is run as ``head(features(images))`` so that classifiers sharing an
    encoder share its forward pass; any other module (e.g. a baseline-zoo network) as ``model(images)``.
    ``num_outputs`` is the width every classifier must output: the dataset's class count by default,
    the reference's for a shift whose spec maps reference logits onto its classes (ImageNet-R, ObjectNet).
    """
    if not classifiers:
        raise ValueError("evaluate() needs at least one classifier")
    device = torch.device(device)
    manifest = Manifest.load(directory)
    n = manifest.num_samples
    width = len(manifest.classes) if num_outputs is None else num_outputs
    logits = {name: np.zeros((n, width), dtype=np.float32) for name in classifiers}
    labels = np.full(n, -1, dtype=np.int64)
    metas: list[dict] = [{} for _ in range(n)] if keep_meta else []
    by_encoder: dict[int, list[str]] = {}
    for name, clf in classifiers.items():
        clf.eval()
        shared = clf.visual if isinstance(clf, Classifier) else clf
        by_encoder.setdefault(id(shared), []).append(name)

    start = time.perf_counter()
    loader = make_loader(directory, transform, batch_size, num_workers=workers, with_index=True, with_meta=keep_meta)
    seen = 0
    with tqdm(total=n, desc=desc, disable=not progress, unit="img", dynamic_ncols=True) as bar:
        for batch in loader:
            images, targets, index = batch[0], batch[1], batch[2]
            images = images.to(device, non_blocking=True)
            idx = index.numpy()
            with autocast(device, precision):
                for names in by_encoder.values():
                    first = classifiers[names[0]]
                    feats = first.features(images) if isinstance(first, Classifier) else images
                    for name in names:
                        clf = classifiers[name]
                        out = clf.head(feats) if isinstance(clf, Classifier) else clf(feats)
                        if out.shape[1] != width:
                            raise ValueError(f"{name} outputs {out.shape[1]} classes, but {width} are expected for {directory}")
                        logits[name][idx] = out.float().cpu().numpy()
            labels[idx] = targets.numpy()
            if keep_meta:
                for i, meta in zip(idx, batch[4]):
                    metas[i] = meta
            seen += len(idx)
            bar.update(len(idx))
    if seen != n or (labels < 0).any():
        raise RuntimeError(f"{directory}: read {seen} samples but the manifest lists {n}")
    return Predictions(labels, logits, metas, time.perf_counter() - start)


class LogitsCache:
    """Logits on disk, one ``.npz`` per (classifier, dataset, transform); written atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, classifier_hash: str, manifest_hash: str, transform: str) -> Path:
        return self.root / f"{classifier_hash[:20]}-{manifest_hash[:20]}-{transform}.npz"

    def get(self, key: Path) -> tuple[np.ndarray, np.ndarray] | None:
        if not key.is_file():
            return None
        try:
            with np.load(key) as data:
                return data["logits"], data["labels"]
        except (OSError, ValueError, KeyError):  # damaged file: recompute rather than trust it
            return None

    def put(self, key: Path, logits: np.ndarray, labels: np.ndarray) -> None:
        key.parent.mkdir(parents=True, exist_ok=True)
        tmp = key.with_name(f".{key.name}.tmp.npz")
        np.savez(tmp, logits=logits, labels=labels)
        tmp.replace(key)


def evaluate_cached(classifiers: Mapping[str, Classifier], directory: str | Path, transform: Callable,
                    cache: LogitsCache | None, **kwargs) -> Predictions:
    """:func:`evaluate`, skipping the classifiers whose logits on this dataset are already cached.

    Per-sample metadata is not cached, so ``keep_meta=True`` always evaluates.
    """
    if cache is None or kwargs.get("keep_meta"):
        return evaluate(classifiers, directory, transform, **kwargs)
    manifest_hash = Manifest.load(directory).content_hash()
    tid = transform_id(transform)
    keys = {name: cache.path(clf.content_hash(), manifest_hash, tid) for name, clf in classifiers.items()}
    cached = {name: cache.get(key) for name, key in keys.items()}
    todo = {name: classifiers[name] for name, hit in cached.items() if hit is None}
    fresh = evaluate(todo, directory, transform, **kwargs) if todo else None
    labels = fresh.labels if fresh else next(iter(cached.values()))[1]
    out = {}
    for name in classifiers:
        if fresh is not None and name in fresh.logits:
            cache.put(keys[name], fresh.logits[name], fresh.labels)
            out[name] = fresh.logits[name]
        else:
            out[name] = cached[name][0]
    return Predictions(labels, out, [], fresh.seconds if fresh else 0.0)
