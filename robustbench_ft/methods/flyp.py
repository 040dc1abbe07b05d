"""FLYP (Goyal et al., Finetune like you pretrain: Improved finetuning of zero-shot vision models, CVPR 2023).

Fine-tune *both* towers of a copy of the CLIP model with CLIP's own contrastive loss on
(image, caption) pairs, where the caption of an image is one of the reference dataset's prompt
templates, drawn at random for every image and step, filled with its class name. The temperature is
the model's learnable ``logit_scale``. Classification then uses the zero-shot head rebuilt from the
fine-tuned text tower (and the fine-tuned ``logit_scale``), exactly as for the pretrained model.

Defaults are the paper's ImageNet recipe (the authors' code, ``locuslab/FLYP``): AdamW over all
parameters, lr 1e-5, weight decay 0.1, batch 512, 10 epochs, 500 warmup steps then cosine decay,
no gradient clipping. The paper draws the caption by sampling (image, template) rows of a table of
all pairs; drawing a template per image per epoch gives the same distribution. The draw comes from the
sample's own seed (seed, epoch, index), so it is the same for any worker count, process count or resume.

The loss couples the whole batch (every other pair is a negative), so gradient accumulation and DDP
must not shrink the set of negatives: the features of the other micro-batches and of the other ranks
enter each micro-batch's loss as constants (computed without gradient, gathered across ranks), and
only the micro-batch's own features carry gradient. Summed over micro-batches (and averaged over
ranks by DDP, with the loss scaled by the world size), this is the gradient of the full-batch loss;
the temperature's direct gradient is counted once. Accumulation costs one extra forward pass.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from open_clip.loss import ClipLoss

from robustbench_ft import distributed
from robustbench_ft.datasets.registry import get_dataset
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.finetune import ScheduleOptions, run_training
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.training import Batch, Step
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.models.zeroshot import fill_template


@dataclass(frozen=True)
class FlypOptions(ScheduleOptions):
    lr: float = 1e-5
    grad_clip: float = 0.0   # the FLYP code does not clip gradients


_CLIP_LOSS = ClipLoss()  # open_clip's, on one process: the features it gets are already gathered


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3) for a batch of N matching pairs: open_clip's
    ``ClipLoss`` on L2-normalised [N, D] features, ``logit_scale`` = exp(t). Row i of each is a positive
    pair, every other row a negative (the mean of the image→text and text→image cross-entropies)."""
    return _CLIP_LOSS(image_features, text_features, logit_scale)


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged in value, with its gradient multiplied by ``factor``."""
    return x.detach() + factor * (x - x.detach())


def clip_features(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor):
    """(normalised image features, normalised text features, exp(logit_scale)) through the model's
    forward (so that DistributedDataParallel sees the call), whichever output form it has."""
    out = model(images, texts)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


class CaptionedContrastiveLoss:
    """FLYP's objective for a CLIP model and a batch of (images, class labels): captions from random templates.

    ``tokens[t, c]`` is template t filled with class c, tokenised once up front; the template of
    each image is its seed modulo the number of templates (a uniform draw, fixed by the sample's
    seed). See the module docstring for accumulation and DDP.
    """

    def __init__(self, tokenizer, classnames: list[str], templates: list[str]):
        texts = [fill_template(template, name) for template in templates for name in classnames]
        self.tokens = tokenizer(texts).view(len(templates), len(classnames), -1)

    def captions(self, labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] of one template per label, drawn by the sample seeds."""
        return self.tokens[seeds.cpu() % self.tokens.shape[0], labels.cpu()]

    def __call__(self, step: Step, batch: Batch) -> float:
        texts = self.captions(batch.labels, batch.seeds).to(batch.images.device)
        parts = list(zip(batch.images.chunk(step.accum_steps), texts.chunk(step.accum_steps)))
        world = distributed.world()
        if len(parts) > 1:  # every micro-batch's features, as constants
            with torch.no_grad(), step.autocast():
                cached = [clip_features(step.model, images, tokens)[:2] for images, tokens in parts]
            all_images = distributed.all_gather_tensor(torch.cat([c[0] for c in cached]))
            all_texts = distributed.all_gather_tensor(torch.cat([c[1] for c in cached]))
        start = world.rank * len(batch.labels)  # this rank's rows in the gathered batch
        for i, (images, tokens) in enumerate(parts):
            last = i == len(parts) - 1
            with step.sync(last):
                with step.autocast():
                    image_features, text_features, scale = clip_features(step.model, images, tokens)
                    if len(parts) == 1:
                        all_images = distributed.all_gather_tensor(image_features)
                        all_texts = distributed.all_gather_tensor(text_features)
                    end = start + len(images)
                    image_features = torch.cat([all_images[:start], image_features, all_images[end:]])
                    text_features = torch.cat([all_texts[:start], text_features, all_texts[end:]])
                    scale = scale_grad(scale, 1 / world.world_size if last else 0.0)  # its gradient once in all
                    loss = clip_loss(image_features, text_features, scale)
                (loss * world.world_size).backward()
            start = end
        return loss.item()


def flyp_classifier(ctx: MethodContext, opts: FlypOptions) -> Classifier:
    """Contrastively fine-tune a copy of the CLIP model, then build its zero-shot classifier."""
    ref = get_dataset(ctx.suite.reference)
    model = copy.deepcopy(ctx.clip.model)  # ctx.clip stays the pretrained model
    for p in model.parameters():
        p.requires_grad_(True)
    loss = CaptionedContrastiveLoss(ctx.clip.tokenizer, list(ref.classnames), list(ref.templates))
    summary = run_training(ctx, model, opts, loss, "FLYP fine-tuning")
    finetuned = replace(ctx.clip, model=model.eval())
    return Classifier.zeroshot(finetuned, ref.classnames, ref.templates, provenance={
        "model": ctx.clip.name, "method": "flyp", "training": summary,
        "logit_scale": float(model.logit_scale.detach().exp())})


@register_method("flyp", paper="Goyal et al., Finetune like you pretrain: Improved finetuning of zero-shot vision "
                 "models, CVPR 2023",
                 defaults="FLYP README ImageNet command (locuslab/FLYP @ 215d5bb): lr 1e-5, wd 0.1, batch 512, 10 epochs, "
                          "500 warmup steps (src/args.py), no gradient clipping")
class Flyp:
    """Contrastive fine-tuning of both towers on template captions; head rebuilt from the fine-tuned text tower."""

    options = FlypOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        torch.manual_seed(ctx.config.seed)
        model = ctx.cached_classifier(lambda: flyp_classifier(ctx, ctx.options))
        return [Candidate("flyp", model, alpha=1.0, endpoint="finetuned", base="flyp")]
