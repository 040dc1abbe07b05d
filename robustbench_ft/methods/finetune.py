"""End-to-end fine-tuning with cross-entropy, the head initialised from the zero-shot head.

Defaults are the WiSE-FT paper's ImageNet recipe (Wortsman et al. 2022, App. C): AdamW, lr 3e-5,
weight decay 0.1, batch 512, 10 epochs, 500 warmup steps then cosine decay, gradient clipping 1.0.
Suites may override lengths and learning rate for their scale (see ``Suite.method_defaults``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from robustbench_ft.data.loader import make_loader
from robustbench_ft.data.shards import Manifest
from robustbench_ft.methods.base import Candidate, MethodContext
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.training import OptimConfig, cross_entropy, train
from robustbench_ft.models.classifier import Classifier


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: float = 10.0
    batch_size: int = 512
    lr: float = 3e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    max_steps: int | None = None   # cap on optimisation steps (quick trials); None = from epochs

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("finetune: epochs, batch_size and lr must be positive")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("finetune: warmup_steps, weight_decay and grad_clip must be >= 0")


def finetune_classifier(ctx: MethodContext, start: Classifier, opts: FinetuneOptions, desc: str) -> Classifier:
    """Cross-entropy fine-tuning of every parameter of a copy of ``start`` on the suite's training split."""
    train_dir = ctx.split_dir("train")
    n = Manifest.load(train_dir).num_samples
    steps = opts.max_steps or math.ceil(opts.epochs * n / opts.batch_size)
    model = copy.deepcopy(start).to(ctx.clip.device)
    for p in model.parameters():
        p.requires_grad_(True)

    def batches(epoch: int):
        return make_loader(train_dir, ctx.clip.preprocess_train, opts.batch_size, num_workers=ctx.config.workers,
                           shuffle=True, seed=ctx.config.seed * 1000 + epoch, drop_last=True)

    summary = train(model, batches, OptimConfig(opts.lr, opts.weight_decay, min(opts.warmup_steps, steps),
                                                opts.grad_clip, steps),
                    cross_entropy(opts.label_smoothing), device=ctx.clip.device, precision=ctx.config.precision,
                    progress=ctx.progress, desc=desc)
    model.info.provenance.update({"training": summary})
    return model


@register_method("finetune", paper="Wortsman et al., Robust fine-tuning of zero-shot models, CVPR 2022 "
                 "(standard end-to-end fine-tuning baseline)")
class Finetune:
    """End-to-end fine-tuning (cross-entropy, zero-shot head init)."""

    options = FinetuneOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        import torch

        torch.manual_seed(ctx.config.seed)
        model = ctx.cached_classifier(lambda: finetune_classifier(ctx, ctx.zeroshot, ctx.options, "fine-tuning"))
        return [Candidate("finetune", model, {"endpoint": "finetuned", "alpha": 1.0, "base": "finetune"})]
