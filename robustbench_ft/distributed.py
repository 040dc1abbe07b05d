"""torch.distributed for ``torchrun``: one process per GPU (or CPU process), ranks from the environment.

``torchrun --nproc_per_node N -m robustbench_ft.cli run ...`` starts N copies of the same run; they
find each other through ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``.
:func:`process_group` joins them (NCCL on CUDA, gloo on CPU); every other helper here is a no-op
in a single process, so the rest of the harness calls them unconditionally. The division of work:
fine-tuning wraps the model in DistributedDataParallel and each rank loads its slice of every
global batch (:mod:`robustbench_ft.loading.training_batches`); evaluation splits shards by rank and sums
the logits back together (:func:`all_reduce_sum`); only rank 0 writes caches, checkpoints, records
and reports, and the others wait at a barrier where they would read them.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world() -> World:
    """This process's place in the process group (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group(device: str) -> Iterator[World]:
    """Join the process group that ``torchrun`` set up in the environment, for the duration of a run.

    NCCL when the run uses CUDA (each rank on GPU ``LOCAL_RANK``), gloo on CPU. Outside torchrun, or
    when the caller already initialised a group, nothing is created or destroyed.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield world()
        return
    uses_cuda = device != "cpu" and torch.cuda.is_available()
    if uses_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if uses_cuda else "gloo")
    try:
        yield world()
    finally:
        dist.destroy_process_group()


def rank_device(device: str) -> str:
    """The device this rank runs on: ``cuda:LOCAL_RANK`` for a CUDA run under torchrun, else ``device``."""
    w = world()
    if w.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{w.local_rank}"
    return device


def barrier() -> None:
    if world().distributed:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a dataset or writes a cache), then the others run it."""
    w = world()
    if w.distributed and not w.is_main:
        dist.barrier()
    yield
    if w.distributed and w.is_main:
        dist.barrier()


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(array: np.ndarray) -> np.ndarray:
    """Element-wise sum of ``array`` over ranks (every rank gets it). Ranks that fill disjoint rows of
    zero-initialised arrays get the assembled array, exactly (x + 0 = x in floating point)."""
    if not world().distributed:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank number over all ranks (e.g. a loss: the global batch's, on every rank)."""
    if not world().distributed:
        return value
    return float(all_reduce_sum(np.array([value], dtype=np.float64))[0]) / world().world_size


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (pickled; for small things such as per-sample metadata)."""
    if not world().distributed:
        return [obj]
    out: list[Any] = [None] * world().world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' ``tensor`` (same shape on every rank) concatenated along dim 0, without gradient."""
    if not world().distributed:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(world().world_size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks (rank 0's weights are broadcast)."""
    if not world().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
