"""The supervised training loop shared by the fine-tuning methods (WiSE-FT paper recipe).

AdamW with decoupled weight decay by default (any optimizer through an :class:`OptimizerFactory`),
linear warmup then cosine decay to zero, gradient-norm clipping (``grad_clip=0`` turns it off),
optional bf16 autocast. A non-finite loss stops training with the step that produced it.

Three things make long runs practical without changing what is computed:

* **Gradient accumulation.** A step's batch can be processed in ``accum_steps`` micro-batches whose
  gradients add up to the whole batch's (each micro-batch loss weighted by its share of the batch);
  the optimiser still steps once per ``batch_size`` samples.
* **Resume.** Every ``checkpoint_every`` steps the model, optimiser, step and RNG state are written
  atomically; a rerun of the same config continues from there. The data position needs no saving:
  step ``s`` is batch ``s mod B`` of epoch ``s div B`` of an order fixed by (seed, epoch)
  (:mod:`robustbench_ft.loading.training_batches`), so the resumed run sees exactly the batches the
  uninterrupted run would have.
* **DDP.** Under torchrun the model is wrapped in DistributedDataParallel and every rank processes
  its slice of each global batch; averaged gradients equal the one-process gradient.

Two extension points serve methods that change the step itself: an :class:`OptimizerFactory`
(FTP, SPD, DiGraP replace AdamW; their whole state must live in ``optimizer.state_dict()``, which is
what a resumable state saves), and :meth:`Step.generator`, a random generator per optimisation step
seeded by (run seed, step) alone, so a per-step draw (m²-mix's λ) is the same for any worker count,
on every DDP rank and after a resume.
"""
from __future__ import annotations

import io
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, NamedTuple, Protocol

import torch
from tqdm.auto import tqdm

from robustbench_ft import distributed
from robustbench_ft.loading.training_batches import step_seed
from robustbench_ft.methods.curves import TrainingCurve, TrainingLog
from robustbench_ft.models.clip import CheckpointError, autocast, check_state_dict
from robustbench_ft.util import atomic_write_bytes

STATE_FORMAT = "robustbench-ft-training-state"


class Batch(NamedTuple):
    """One step's samples on this rank: images, labels and each sample's seed (for per-sample draws)."""

    images: torch.Tensor
    labels: torch.Tensor
    seeds: torch.Tensor

    def split(self, parts: int) -> list["Batch"]:
        """``parts`` consecutive micro-batches (as equal as possible)."""
        return [Batch(*fields) for fields in zip(*(t.chunk(parts) for t in self))]


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    total_steps: int
    accum_steps: int = 1


NamedParameters = list[tuple[str, torch.nn.Parameter]]


@dataclass(frozen=True)
class OptimizerFactory:
    """Builds a fine-tuning run's optimizer from its named trainable parameters and schedule.

    ``build(named_parameters, cfg)`` returns the optimizer; every state it needs to continue (moments,
    radii, previous steps) must live in ``optimizer.state`` or its param groups, since a resumable
    training state saves ``optimizer.state_dict()`` and nothing else. The learning rate of each param
    group is rescaled every step by the warmup-cosine schedule (relative to the group's initial
    ``lr``). ``name`` and ``options`` enter the resumable state's fingerprint: a state saved by another
    optimizer, or the same with other options, is refused rather than loaded.
    """

    name: str
    build: Callable[[NamedParameters, OptimConfig], torch.optim.Optimizer]
    options: tuple[tuple[str, Any], ...] = ()


def _adamw(named: NamedParameters, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay)


ADAMW = OptimizerFactory("adamw", _adamw)
"""AdamW with decoupled weight decay (``cfg.weight_decay``), PyTorch's defaults otherwise: the WiSE-FT recipe."""


def cosine_lr(step: int, cfg: OptimConfig) -> float:
    """Learning rate at ``step``: linear warmup to ``lr``, then half-cosine to 0 at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * cfg.lr


@dataclass
class Step:
    """What an objective needs to compute one step's gradient: the (possibly DDP-wrapped) model to
    call, how many micro-batches to use, the autocast and gradient-sync contexts, and the step's own
    random generator."""

    model: torch.nn.Module
    accum_steps: int
    device: torch.device
    precision: str
    index: int = 0        # the optimisation step (0-based, counted over the whole run, resumes included)
    seed: int = 0         # the run's seed
    batches_per_epoch: int = 1  # steps per epoch (m²-mix's 1/(epoch+1) schedule)
    total_steps: int = 0        # steps of the whole run (CaRot's teacher-momentum ramp)

    @property
    def epoch(self) -> int:
        """The epoch (0-based) the step belongs to."""
        return self.index // max(1, self.batches_per_epoch)

    def generator(self) -> torch.Generator:
        """A CPU generator seeded by (run seed, step) only: the same draws for any worker count, on
        every DDP rank and after a resume (draw on the CPU, then move the result)."""
        return torch.Generator().manual_seed(step_seed(self.seed, self.index))

    def autocast(self) -> ContextManager:
        return autocast(self.device, self.precision)

    def sync(self, last: bool) -> ContextManager:
        """Around a micro-batch's backward: DDP all-reduces gradients only after the last one."""
        return nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()


Objective = Callable[[Step, Batch], float]
"""Computes the loss of a step's batch, backpropagates its gradient into ``.grad`` and returns its value."""
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
"""The mean loss of a (micro-)batch: a function of the model and the batch."""


def mean_loss(loss_fn: LossFn) -> Objective:
    """The objective of a loss that is a mean over samples (plus terms that do not depend on the batch).

    Micro-batch ``i`` of ``n_i`` samples contributes ``n_i / n · loss_i``, so the accumulated gradient
    is the whole batch's; a batch-independent term (a weight penalty) is counted with total weight 1.
    """
    def objective(step: Step, batch: Batch) -> float:
        micro = batch.split(step.accum_steps)
        total = 0.0
        for i, part in enumerate(micro):
            weight = len(part.labels) / len(batch.labels)
            with step.sync(last=i == len(micro) - 1):
                with step.autocast():
                    loss = loss_fn(step.model, part) * weight
                loss.backward()
            total += loss.item()
        return total

    return objective


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    def loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(batch.images), batch.labels, label_smoothing=label_smoothing)

    return loss


class TrainingData(Protocol):
    """The batches of a training run, by epoch (see :class:`robustbench_ft.loading.training_batches.TrainingBatches`)."""

    batches_per_epoch: int

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterable[list[torch.Tensor]]: ...


@dataclass(frozen=True)
class Checkpointing:
    """Where a run keeps its resumable state, and how often (in steps) it saves it; 0 = never. ``curve``:
    where its training curve is written (beside the classifier it trains; see :mod:`.curves`);
    ``tensorboard``: a directory for TensorBoard event files, or None."""

    path: Path
    every: int
    curve: Path | None = None
    tensorboard: Path | None = None


def train(model: torch.nn.Module, data: TrainingData, cfg: OptimConfig, objective: Objective, *,
          device: torch.device, precision: str = "fp32", progress: bool = True, desc: str = "fine-tuning",
          checkpointing: Checkpointing | None = None, log: Callable[[str], None] = print,
          optimizer_factory: OptimizerFactory = ADAMW, seed: int = 0) -> dict[str, float]:
    """Train ``model`` in place for ``cfg.total_steps`` steps on ``data``; resumes from ``checkpointing.path``.

    ``optimizer_factory`` builds the optimizer (AdamW by default); ``seed`` seeds :meth:`Step.generator`.
    Returns a summary (steps, epochs, final loss, and the step a resumed run started from).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("nothing to train: every parameter is frozen")
    params = [p for _, p in named]
    optimizer = optimizer_factory.build(named, cfg)
    for group in optimizer.param_groups:  # the schedule scales each group from its own initial rate
        group.setdefault("initial_lr", group["lr"])
    per_epoch = data.batches_per_epoch
    fingerprint = {**asdict(cfg), "batches_per_epoch": per_epoch,
                   "optimizer": {"name": optimizer_factory.name, "options": [list(kv) for kv in optimizer_factory.options]}}
    step, last_loss, curve = 0, float("nan"), TrainingCurve()
    if checkpointing is not None and checkpointing.path.is_file():
        step, last_loss, curve = _load_state(checkpointing.path, model, optimizer, device, fingerprint, log)
    resumed_from = step
    world = distributed.world()
    monitor = TrainingLog(curve, checkpointing.curve if checkpointing else None,
                          checkpointing.tensorboard if checkpointing else None, write=world.is_main)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wrapped = distributed.wrap_ddp(model, device)
    ctx = Step(wrapped, cfg.accum_steps, device, precision, seed=seed, batches_per_epoch=per_epoch,
               total_steps=cfg.total_steps)
    model.train()
    epoch, position = divmod(step, per_epoch)
    bar = tqdm(total=cfg.total_steps, initial=step, desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
    while step < cfg.total_steps:
        seen = 0
        for raw in data.epoch(epoch, position):
            seen += 1
            batch = Batch(*(t.to(device, non_blocking=True) for t in raw))
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * cosine_lr(step, cfg) / cfg.lr
            optimizer.zero_grad(set_to_none=True)
            ctx.index = step
            # the global batch's loss, the same on every rank (so all ranks stop together on a bad one)
            loss = distributed.mean_over_ranks(objective(ctx, batch))
            if not math.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss} at step {step} (epoch {epoch})"
                                         f"{_non_finite_tensor(model)}; lower the learning rate or check the data")
            # the total gradient norm before clipping (for the curve); without clipping nothing is changed
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else \
                _total_norm(params)
            optimizer.step()
            monitor.step(step, loss, optimizer.param_groups[0]["lr"], float(grad_norm))
            step += 1
            last_loss = loss
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if checkpointing is not None and checkpointing.every and step % checkpointing.every == 0 \
                    and step < cfg.total_steps:
                _save_state(checkpointing.path, model, optimizer, step, per_epoch, last_loss, device, fingerprint,
                            curve)
                monitor.save()
            if step >= cfg.total_steps:
                break
        if seen == 0:
            raise ValueError(f"{desc}: the training data yielded no batch")
        epoch, position = epoch + 1, 0
    bar.close()
    monitor.close()
    model.eval()
    summary = {"steps": step, "epochs": round(step / per_epoch, 4), "final_loss": last_loss,
               **_setup_facts(data, cfg, world.world_size, device), "curve": curve.downsampled()}
    if checkpointing is not None and checkpointing.curve is not None:
        summary["curve_file"] = str(checkpointing.curve)
    if resumed_from:
        summary["resumed_from_step"] = resumed_from
    return summary


def _total_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients together, as ``clip_grad_norm_`` computes it (the norm of the per-tensor norms)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)


def _setup_facts(data: TrainingData, cfg: OptimConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    """How the steps were run: global batch, accumulation, devices, the micro-batch per device, peak memory
    (CUDA: the most allocated on this device during training; CPU: the process's peak resident size)."""
    batch = getattr(data, "batch_size", None)
    facts: dict[str, Any] = {"global_batch": batch, "accum_steps": cfg.accum_steps, "devices": world_size,
                             "micro_batch": batch // world_size // cfg.accum_steps if batch else None,
                             "device_type": device.type}
    if device.type == "cuda":
        facts.update(peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)),
                     peak_memory_kind="cuda_max_allocated")
    else:
        import resource

        facts.update(peak_memory_bytes=int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
                     peak_memory_kind="process_max_rss")
    return facts


def _non_finite_tensor(model: torch.nn.Module) -> str:
    """Which tensor a non-finite loss shows in, if one does: the first parameter holding NaN/Inf (a
    bad starting checkpoint, or a step that diverged), else the first such gradient. Only run on failure."""
    named = list(model.named_parameters())
    for name, p in named:
        if not bool(torch.isfinite(p).all()):
            return f"; parameter {name!r} holds NaN/Inf"
    for name, p in named:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"; the gradient of {name!r} holds NaN/Inf"
    return ""


def _rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, per_epoch: int,
                last_loss: float, device: torch.device, fingerprint: dict, curve: TrainingCurve) -> None:
    """Write the resumable state atomically (rank 0 only): a kill mid-write leaves the previous one."""
    if not distributed.world().is_main:
        return
    buffer = io.BytesIO()
    torch.save({"format": STATE_FORMAT, "version": 1, "fingerprint": fingerprint, "step": step,
                "epoch": step // per_epoch, "batch_in_epoch": step % per_epoch, "last_loss": last_loss,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(device),
                "curve": curve.to_dict()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                fingerprint: dict, log: Callable[[str], None]) -> tuple[int, float, TrainingCurve]:
    """Restore model, optimiser and RNG from a saved state; returns (step, last loss, the curve so far). An
    unreadable file is set aside (training starts over); a state saved for another schedule is an error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ValueError("not a training state")
    except Exception as exc:  # noqa: BLE001 (torch.load raises many types for a damaged file)
        log(f"ignoring unreadable training state {path} ({exc}); training from the start")
        return 0, float("nan"), TrainingCurve()
    saved = state["fingerprint"]
    if isinstance(saved, dict) and saved.get("optimizer") != fingerprint["optimizer"]:
        raise ValueError(f"{path} was saved for another schedule: by optimizer {saved.get('optimizer')}, and this run "
                         f"uses {fingerprint['optimizer']}; delete the file to train from the start")
    if saved != fingerprint:
        raise ValueError(f"{path} was saved for another schedule ({saved}, now {fingerprint}): the "
                         "training data changed since; delete the file to train from the start")
    try:  # a state of the right schedule but another model (or edited by hand): refuse, naming the file
        check_state_dict(model.state_dict(), state["model"], str(path))
        optimizer.load_state_dict(state["optimizer"])
        model.load_state_dict(state["model"])
        torch.set_rng_state(state["rng"]["cpu"])
    except (CheckpointError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"training state {path} does not fit this run ({exc}); delete the file to train from the "
                         "start") from exc
    if device.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    log(f"resuming from step {state['step']} (epoch {state['epoch']}, batch {state['batch_in_epoch']}) of {path}")
    return int(state["step"]), float(state["last_loss"]), TrainingCurve.from_dict(state.get("curve")).upto(
        int(state["step"]))
