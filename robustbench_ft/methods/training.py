"""The supervised training loop shared by the fine-tuning methods (WiSE-FT paper recipe).

AdamW with decoupled weight decay, linear warmup then cosine decay to zero, gradient-norm
clipping, optional bf16 autocast. A non-finite loss stops training with the step that produced it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from robustbench_ft.models.clip import autocast

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    total_steps: int


def cosine_lr(step: int, cfg: OptimConfig) -> float:
    """Learning rate at ``step``: linear warmup to ``lr``, then half-cosine to 0 at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * cfg.lr


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    def loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=label_smoothing)

    return loss


def train(model: torch.nn.Module, batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
          cfg: OptimConfig, loss_fn: LossFn, *, device: torch.device, precision: str = "fp32",
          progress: bool = True, desc: str = "fine-tuning") -> dict[str, float]:
    """Train ``model`` in place for ``cfg.total_steps`` steps; ``batches(epoch)`` yields (images, labels).

    Returns a summary (steps, final loss, epochs seen).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    step, epoch, last_loss = 0, 0, float("nan")
    bar = tqdm(total=cfg.total_steps, desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
    while step < cfg.total_steps:
        seen = 0
        for images, labels in batches(epoch):
            seen += 1
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, cfg)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, precision):
                loss = loss_fn(model, images, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step} (epoch {epoch}); "
                                         "lower the learning rate or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            step += 1
            last_loss = loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if step >= cfg.total_steps:
                break
        if seen == 0:
            raise ValueError(f"{desc}: the training data yielded no batch")
        epoch += 1
    bar.close()
    model.eval()
    return {"steps": step, "epochs": epoch, "final_loss": last_loss}
