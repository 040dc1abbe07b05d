"""Random access to the samples of a shard set, for training: an order that depends on nothing but (seed, epoch).

The streaming reader (:mod:`robustbench_ft.loading.shard_dataset`) splits a shard set by shard across ranks
and DataLoader workers, so any shuffled order it produced would depend on the worker count, which
is not part of a run's identity. Training reads samples here instead, by position:

* **Index.** Each tar shard is scanned once for its members' byte offsets (tar headers only; the
  ``.cls`` labels are read on the way): sample ``i`` in manifest order maps to (shard, offset,
  size, label). The index lives in memory per process and is stored next to the manifest as
  ``sample-index.npz`` (written atomically, keyed by the manifest's content hash) when the directory
  is writable, so a large set is scanned once, not per run.
* **Order.** Epoch ``e`` visits a permutation of all samples drawn from (seed, e) only
  (:func:`epoch_order`), cut into global batches of ``batch_size``; the last partial batch is
  dropped, so every optimisation step sees a full batch. Under DDP rank ``r`` of ``W`` takes the
  ``r``-th slice of ``batch_size / W`` samples of every global batch: the ranks' batches together
  are exactly the one-process batch.
* **Augmentation.** The random train transform of sample ``i`` in epoch ``e`` runs with the torch,
  ``random`` and numpy generators seeded from (seed, e, i) (:func:`sample_seed`, :func:`seeded_rngs`),
  so the augmented tensor does not depend on which worker or rank produced it, nor on what ran before. The same per-sample seed comes with the batch for other per-sample draws
  (FLYP's caption template).

Hence batches are identical for any ``--workers``, any world size (as a union over ranks) and after
a resume at any step.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from robustbench_ft.loading.shard_dataset import decode_image
from robustbench_ft.shards.manifest import MANIFEST_FILE, REBUILD_HINT, Manifest, ShardError
from robustbench_ft.shards.reader import image_member, parse_label
from robustbench_ft.shards.tarformat import TarFormatError, iter_shard_samples, read_span
from robustbench_ft.shards.verify import check_shard_files
from robustbench_ft.util import atomic_write_bytes

INDEX_FILE = "sample-index.npz"
_INDEX_VERSION = 1
_MEMORY: dict[tuple[str, str], "SampleIndex"] = {}


class SampleIndex(NamedTuple):
    """Where every sample of a shard set is, in manifest order (arrays of length ``num_samples``)."""

    key: np.ndarray      # bytes: the sample key (for error messages)
    shard: np.ndarray    # int32: index into manifest.shards
    offset: np.ndarray   # int64: byte offset of the image data in the shard file
    size: np.ndarray     # int64: byte length of the image data
    label: np.ndarray    # int64: class index


def index_shard(path: Path, num_classes: int, expected_samples: int) -> list[tuple[str, int, int, int]]:
    """(key, image offset, image size, label) of every sample of one tar shard, in stored order.

    Reads tar headers and the small ``.cls`` members only. A malformed shard raises
    :class:`ShardError` naming the file (and key), like the streaming reader.
    """
    out: list[tuple[str, int, int, int]] = []
    try:
        with open(path, "rb") as f:
            for key, members in iter_shard_samples(f, path):
                image = members[image_member(path, key, members)]
                label = parse_label(path, key, read_span(f, members["cls"], f"member {key}.cls"), num_classes)
                out.append((key, image[0], image[1], label))
    except (TarFormatError, OSError) as e:
        raise ShardError(f"shard {path} is unreadable after {len(out)} samples ({e}): it is truncated or corrupt; "
                         f"{REBUILD_HINT}") from e
    if len(out) != expected_samples:
        raise ShardError(f"shard {path} holds {len(out)} samples but the manifest says {expected_samples}: it is "
                         f"truncated or was replaced; {REBUILD_HINT}")
    return out


def load_index(directory: Path, manifest: Manifest) -> SampleIndex:
    """The sample index of a shard set: from memory, from ``sample-index.npz``, or by scanning the shards."""
    content = manifest.content_hash()
    memo = (str(directory.resolve()), content)
    if memo in _MEMORY:
        return _MEMORY[memo]
    path = directory / INDEX_FILE
    index = _read_index_file(path, content, manifest.num_samples)
    if index is None:
        keys: list[str] = []
        rows: list[tuple[int, int, int, int]] = []
        for s, info in enumerate(manifest.shards):
            for key, *row in index_shard(directory / info.name, len(manifest.classes), info.num_samples):
                keys.append(key)
                rows.append((s, *row))
        table = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
        index = SampleIndex(np.asarray(keys, dtype=np.bytes_), table[:, 0].astype(np.int32), table[:, 1].copy(),
                            table[:, 2].copy(), table[:, 3].copy())
        _write_index_file(path, content, index)
    _MEMORY[memo] = index
    return index


def _read_index_file(path: Path, content: str, num_samples: int) -> SampleIndex | None:
    try:
        with np.load(path) as data:
            if int(data["version"]) != _INDEX_VERSION or str(data["manifest"]) != content:
                return None  # built for other shards (the set was rebuilt): scan again
            index = SampleIndex(*(data[name] for name in SampleIndex._fields))
    except (OSError, ValueError, KeyError):  # absent or damaged: scan again rather than trust it
        return None
    return index if all(len(a) == num_samples for a in index) else None


def _write_index_file(path: Path, content: str, index: SampleIndex) -> None:
    """Store the index next to the manifest, atomically; a read-only dataset directory just skips it."""
    buffer = io.BytesIO()
    np.savez(buffer, version=_INDEX_VERSION, manifest=content, **index._asdict())
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:
        pass


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the random draws of sample ``index`` in ``epoch`` of a run seeded ``seed``."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def step_seed(seed: int, step: int) -> int:
    """The seed of optimisation step ``step`` of a run seeded ``seed`` (see ``methods.training.Step``);
    distinct from every sample seed (those have epochs >= 0) and epoch order (index -1)."""
    return sample_seed(seed, -1, step)


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and Python's and numpy's global generators for a block.

    Transform pipelines draw from any of the three (torchvision from torch, timm augmentations from
    ``random`` and numpy). Torch's and Python's states are restored afterwards, so the caller's
    streams (dropout, ...) are untouched; numpy's is left reseeded, because saving and restoring it
    costs ~200 µs a sample (more than decoding one) and nothing in training draws from it.
    """
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that also seeds CUDA, 400 µs
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)


class ShardSamples(Dataset):
    """Map-style dataset over a shard set: item ``i`` is sample ``i`` in manifest order.

    Yields ``(image, label, seed)``: the image passed through ``transform`` with the generators
    seeded by :func:`sample_seed` (``seed``, the epoch set by :meth:`set_epoch`, ``i``), and that
    seed. ``verify`` is :func:`~robustbench_ft.shards.verify.check_shard_files`'s level, checked at
    construction. Shard files are opened lazily, once per process (DataLoader workers included).
    """

    def __init__(self, directory: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None, *,
                 seed: int = 0, verify: str = "size"):
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        check_shard_files(self.manifest, self.directory, verify)
        self.index = load_index(self.directory, self.manifest)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentation draws ``__getitem__`` makes (set before creating a loader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # open files stay with the process that opened them

    def read(self, i: int) -> bytes:
        """The encoded image bytes of sample ``i``."""
        if self._pid != os.getpid():  # a forked worker: its own file positions
            self._files, self._pid = {}, os.getpid()
        shard = int(self.index.shard[i])
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.directory / self.manifest.shards[shard].name, "rb")
        size = int(self.index.size[i])
        f.seek(int(self.index.offset[i]))
        data = f.read(size)
        if len(data) != size:
            raise ShardError(f"shard {f.name}: sample {self.key(i)!r} ends past the end of the file: it was "
                             f"truncated or replaced after {MANIFEST_FILE} was read; {REBUILD_HINT}")
        return data

    def key(self, i: int) -> str:
        return self.index.key[i].decode("ascii")

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        i = int(i)
        shard = self.directory / self.manifest.shards[int(self.index.shard[i])].name
        image = decode_image(self.read(i), shard, self.key(i))
        seed = sample_seed(self.seed, self.epoch, i)
        if self.transform is not None:
            with seeded_rngs(seed):
                image = self.transform(image)
        return image, int(self.index.label[i]), seed


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(num_samples)`` that epoch ``epoch`` of a run seeded ``seed`` visits."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
    return torch.randperm(num_samples, generator=generator)


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """Samples per step on each of ``world_size`` ranks; the global batch must split evenly."""
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the number of processes {world_size}; "
                         "choose a batch size that splits evenly across them")
    return batch_size // world_size


def rank_indices(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0) -> list[int]:
    """The sample indices rank ``rank`` reads in ``epoch``, from global batch ``start_batch`` on.

    Global batch ``b`` is ``order[b*batch_size : (b+1)*batch_size]`` (only full batches); the rank
    takes the ``rank``-th of its ``world_size`` equal slices.
    """
    batches = num_samples // batch_size
    per_rank = per_rank_batch(batch_size, world_size)
    order = epoch_order(num_samples, seed, epoch)[: batches * batch_size].view(batches, batch_size)
    return order[start_batch:, rank * per_rank:(rank + 1) * per_rank].reshape(-1).tolist()


class TrainingBatches:
    """The training stream of a shard set: ``epoch(e, start)`` is a DataLoader of (images, labels, seeds).

    ``batch_size`` is the global batch; each of the ``world_size`` ranks loads ``batch_size /
    world_size`` samples per step (see the module docstring for the order).
    """

    def __init__(self, directory: str | os.PathLike, transform: Callable[[Image.Image], torch.Tensor],
                 batch_size: int, *, seed: int, workers: int = 0, rank: int = 0, world_size: int = 1,
                 verify: str = "size"):
        if transform is None:
            raise ValueError("TrainingBatches needs a transform that turns PIL images into tensors (batches stack)")
        self.dataset = ShardSamples(directory, transform, seed=seed, verify=verify)
        self.batch_size, self.seed, self.workers = batch_size, seed, workers
        self.rank, self.world_size = rank, world_size
        self.per_rank = per_rank_batch(batch_size, world_size)
        self.batches_per_epoch = len(self.dataset) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"the training split {directory} has {len(self.dataset)} samples, fewer than one batch "
                             f"({batch_size}); lower --batch-size")

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterable[list]:
        """This rank's batches of ``epoch`` from batch ``start_batch`` on (a resumed run starts mid-epoch)."""
        self.dataset.set_epoch(epoch)
        indices = rank_indices(len(self.dataset), self.batch_size, self.seed, epoch, self.rank, self.world_size,
                               start_batch)
        # Own generator: creating the loader must not draw from the global torch RNG (resume replays it).
        return DataLoader(self.dataset, batch_size=self.per_rank, sampler=indices,
                          num_workers=self.workers, pin_memory=torch.cuda.is_available(), drop_last=True,
                          generator=torch.Generator().manual_seed(0))


def labelled_batches(directory: str | os.PathLike, transform: Callable[[Image.Image], torch.Tensor],
                     batch_size: int, *, workers: int = 0,
                     shuffle_seed: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of a shard set with ``transform``: in manifest order, or in the order
    :func:`epoch_order` gives for ``shuffle_seed`` (the same for any worker count). The last batch
    may be smaller."""
    dataset = ShardSamples(directory, transform)
    order = range(len(dataset)) if shuffle_seed is None else epoch_order(len(dataset), shuffle_seed, 0).tolist()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=list(order), num_workers=workers,
                        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))
    for images, labels, _seeds in loader:
        yield images, labels
