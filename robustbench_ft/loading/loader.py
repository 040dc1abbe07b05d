"""``make_loader``: a DataLoader over a shard set, local or streamed from a URL."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from robustbench_ft.loading.shard_dataset import ShardDataset, collate_with_meta
from robustbench_ft.loading.stream_dataset import StreamingShardDataset, is_streamed


def make_loader(
    directory: str | os.PathLike,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    *,
    verify: str = "size",
    with_index: bool = False,
    with_meta: bool = False,
    on_bad: str = "error",
    decoder: Callable[[bytes, Path, str], Any] | None = None,
    **loader_kwargs: Any,
) -> DataLoader:
    """A DataLoader of batches ``[images, labels]`` (+ ``indices`` with ``with_index``, + ``keys``
    and ``metas`` lists with ``with_meta``) over a shard set; see :class:`ShardDataset`. A ``directory``
    that is an http(s):// or file:// URL is streamed, each shard hash-checked as it arrives
    (:class:`~robustbench_ft.loading.stream_dataset.StreamingShardDataset`).

    ``transform`` must turn a PIL image into a tensor so that batches stack. ``on_bad`` is
    :class:`ShardDataset`'s. Memory is pinned when CUDA is available unless ``pin_memory`` is given; other ``loader_kwargs`` go to the DataLoader.
    Each worker ends with its own partial batch, so with ``num_workers > 1`` there can be up to
    ``num_workers - 1`` more batches than ``len(loader)`` (which counts ``len(dataset) / batch_size``);
    use ``len(loader.dataset)`` (samples on this rank) for progress bars.

    ``decoder`` (evaluation's fast paths, :mod:`robustbench_ft.loading.eval_decode`) replaces PIL
    decoding and ``transform``: it gets ``(image bytes, shard path, key)`` in the worker and must
    raise :class:`ShardError` for a sample that does not decode; give a ``collate_fn`` when its
    outputs do not stack.
    """
    if transform is None and decoder is None:
        raise ValueError("make_loader needs a transform that turns PIL images into tensors (batches are stacked)")
    reader = StreamingShardDataset if is_streamed(directory) else ShardDataset  # a URL streams, hash-checked
    dataset = reader(
        directory, transform, verify=verify, rank=rank, world_size=world_size,
        with_meta=with_meta, with_index=with_index, on_bad=on_bad, decoder=decoder,
    )
    loader_kwargs.setdefault("pin_memory", torch.cuda.is_available())
    if with_meta:
        loader_kwargs.setdefault("collate_fn", collate_with_meta)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, **loader_kwargs)
