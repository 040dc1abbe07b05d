"""End-to-end fine-tuning with cross-entropy, the head initialised from the zero-shot head.

Defaults are the WiSE-FT paper's ImageNet recipe (Wortsman et al. 2022, App. C): AdamW, lr 3e-5,
weight decay 0.1, batch 512, 10 epochs, 500 warmup steps then cosine decay, gradient clipping 1.0.
Suites may override lengths and learning rate for their scale (see ``Suite.method_defaults``).
The schedule options and the training-data stream are shared with the other fine-tuning methods
(LP-FT, L2-SP, FLYP), so that they differ from this baseline only in what their papers change.
``batch_size`` is the effective (global) batch of one optimisation step: ``accum_steps`` splits it
into micro-batches on each process (for memory), torchrun splits it across processes.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from robustbench_ft import distributed
from robustbench_ft.loading.training_batches import TrainingBatches
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.training import (
    ADAMW,
    Batch,
    LossFn,
    Objective,
    OptimConfig,
    OptimizerFactory,
    cross_entropy,
    mean_loss,
    train,
)
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.shards.manifest import Manifest

Penalty = Callable[[torch.nn.Module], torch.Tensor]
"""A regulariser added to the loss, computed from the model being trained (e.g. L2-SP)."""


@dataclass(frozen=True)
class ScheduleOptions:
    """Length and optimiser of a fine-tuning run: AdamW, linear warmup, cosine decay (WiSE-FT recipe)."""

    epochs: float = 10.0
    batch_size: int = 512
    lr: float = 3e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float = 1.0
    max_steps: int | None = None   # cap on optimisation steps (quick trials); None = from epochs
    accum_steps: int = 1           # micro-batches per step (gradient accumulation); batch_size stays the step's batch

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("fine-tuning: epochs, batch_size and lr must be positive")
        if self.accum_steps < 1 or self.batch_size % self.accum_steps:
            raise ValueError(f"fine-tuning: accum_steps must be >= 1 and divide batch_size ({self.batch_size}), "
                             f"got {self.accum_steps}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("fine-tuning: warmup_steps, weight_decay and grad_clip must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("fine-tuning: max_steps must be >= 1 (or none)")

    def optim_config(self, batches_per_epoch: int) -> OptimConfig:
        """The optimiser schedule for a training set of ``batches_per_epoch`` full batches."""
        steps = self.max_steps or math.ceil(self.epochs * batches_per_epoch)
        return OptimConfig(self.lr, self.weight_decay, min(self.warmup_steps, steps), self.grad_clip, steps,
                           self.accum_steps)


@dataclass(frozen=True)
class FinetuneOptions(ScheduleOptions):
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"finetune: label_smoothing must lie in [0, 1), got {self.label_smoothing}")


def training_batches(ctx: MethodContext, batch_size: int) -> TrainingBatches:
    """The suite's training split with the train transform, in an order fixed by (seed, epoch) alone:
    the same batches for any ``--workers`` and, as a union over ranks, any number of processes."""
    world, directory = distributed.world(), ctx.split_dir("train")
    if ctx.config.shots is not None:
        batch_size = fewshot_batch_size(directory, batch_size, world.world_size, ctx.log)
    with distributed.main_first():  # rank 0 indexes the shards (once per set), the others read its index file
        return TrainingBatches(directory, ctx.clip.preprocess_train, batch_size, seed=ctx.config.seed,
                               workers=training_workers(ctx.config.workers, ctx.clip.device),
                               rank=world.rank, world_size=world.world_size)


def fewshot_batch_size(directory: Path, batch_size: int, world_size: int, log) -> int:
    """Under ``--shots``, a batch larger than the K-per-class subset becomes the whole subset: FLYP's few-shot
    recipe trains on all 2k shots as one batch, one step per epoch (locuslab/FLYP @ 215d5bb, src/few_shot.py,
    with --batch-size 256 and k <= 32); a batch that fits is kept."""
    size = Manifest.load(directory).num_samples
    if batch_size <= size:
        return batch_size
    full = size - size % world_size  # the global batch splits evenly over the processes
    log(f"k-shot: the training subset has {size} samples, fewer than one batch of {batch_size}: training on it "
        f"as one full batch of {full}, as FLYP's few-shot recipe does")
    return full


def training_workers(requested: int, device: torch.device) -> int:
    """DataLoader workers for training: ``requested``, except on CPU, where the model's threads already
    occupy every core torch uses and loader processes beyond the cores left free only contend with
    them (demo fine-tuning on 2 cores: 0.59 s/step with 2 workers, 0.46 s/step loading in-process).
    The batches are the same for any worker count, so this changes speed only."""
    if device.type != "cpu":
        return requested
    free = len(os.sched_getaffinity(0)) - torch.get_num_threads()
    return min(requested, max(0, free))


def run_training(ctx: MethodContext, model: torch.nn.Module, opts: ScheduleOptions, objective: Objective,
                 desc: str, optimizer: OptimizerFactory = ADAMW) -> dict:
    """Train ``model`` in place with the run's schedule, data, precision, seed and resumable checkpoints."""
    data = training_batches(ctx, opts.batch_size)
    return train(model, data, opts.optim_config(data.batches_per_epoch), objective, device=ctx.clip.device,
                 precision=ctx.config.precision, progress=ctx.progress, desc=desc,
                 checkpointing=ctx.training_checkpoints(), log=ctx.log, optimizer_factory=optimizer,
                 seed=ctx.config.seed)


def finetune_classifier(ctx: MethodContext, start: Classifier, opts: FinetuneOptions, desc: str,
                        penalty: Penalty | None = None, optimizer: OptimizerFactory = ADAMW,
                        loss: LossFn | None = None) -> Classifier:
    """Cross-entropy fine-tuning of every parameter of a copy of ``start`` on the suite's training split.

    ``penalty(model)``, when given, is added to the loss of every step (L2-SP's pull towards the
    pretrained weights); without it this is plain fine-tuning. ``optimizer`` replaces AdamW (the
    projection methods: FTP, SPD, DiGraP); ``loss`` replaces the cross-entropy (a mean over the
    micro-batch's samples, e.g. function-space regularisation's).
    """
    model = copy.deepcopy(start).to(ctx.clip.device)
    for p in model.parameters():
        p.requires_grad_(True)
    ce = loss if loss is not None else cross_entropy(opts.label_smoothing)

    def loss_fn(m: torch.nn.Module, batch: Batch) -> torch.Tensor:
        loss = ce(m, batch)
        return loss if penalty is None else loss + penalty(distributed.unwrap(m))

    summary = run_training(ctx, model, opts, mean_loss(loss_fn), desc, optimizer)
    model.info.provenance.update({"training": summary})
    return model


@register_method("finetune", paper="Wortsman et al., Robust fine-tuning of zero-shot models, CVPR 2022 "
                 "(standard end-to-end fine-tuning baseline)",
                 defaults="WiSE-FT paper App. D.2 (ImageNet, ViT-B/16): AdamW, lr 3e-5, wd 0.1, batch 512, 10 epochs, "
                          "500 warmup steps + cosine, gradient clipping 1.0")
class Finetune:
    """End-to-end fine-tuning (cross-entropy, zero-shot head init)."""

    options = FinetuneOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        return ctx.trained_endpoint(lambda: finetune_classifier(ctx, ctx.zeroshot, ctx.options, "fine-tuning"))
