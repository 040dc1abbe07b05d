"""FLYP (Goyal et al., Finetune like you pretrain: Improved finetuning of zero-shot vision models, CVPR 2023).

Fine-tune *both* towers of a copy of the CLIP model with CLIP's own contrastive loss on
(image, caption) pairs, where the caption of an image is one of the reference dataset's prompt
templates, drawn at random for every image and step, filled with its class name. The temperature is
the model's learnable ``logit_scale``. Classification then uses the zero-shot head rebuilt from the
fine-tuned text tower (and the fine-tuned ``logit_scale``), exactly as for the pretrained model.

Defaults are the paper's ImageNet recipe (the authors' code, ``locuslab/FLYP``): AdamW over all
parameters, lr 1e-5, weight decay 0.1, batch 512, 10 epochs, 500 warmup steps then cosine decay,
no gradient clipping. The paper draws the caption by sampling (image, template) rows of a table of
all pairs; drawing a template per image per step gives the same distribution.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from robustbench_ft.data.registry import get_dataset
from robustbench_ft.methods.base import Candidate, MethodContext
from robustbench_ft.methods.finetune import ScheduleOptions, train_samples, training_batches
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.training import train
from robustbench_ft.models.classifier import Classifier


@dataclass(frozen=True)
class FlypOptions(ScheduleOptions):
    lr: float = 1e-5
    grad_clip: float = 0.0   # the FLYP code does not clip gradients


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3) for a batch of N matching pairs.

    ``image_features`` and ``text_features`` are L2-normalised [N, D]; ``logit_scale`` is the
    temperature's inverse, exp(t). Row i of each is a positive pair, every other row a negative:
    the mean of the image→text and text→image cross-entropies with targets on the diagonal.
    """
    logits = logit_scale * image_features @ text_features.T
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class CaptionedContrastiveLoss:
    """FLYP's loss for a CLIP model and a batch of (images, class labels): captions from random templates.

    ``tokens[t, c]`` is template t filled with class c, tokenised once up front; the template of
    each image is drawn from a generator seeded by the run's seed, so a run repeats exactly.
    """

    def __init__(self, tokenizer, classnames: list[str], templates: list[str], seed: int):
        texts = [template.format(name) for template in templates for name in classnames]
        self.tokens = tokenizer(texts).view(len(templates), len(classnames), -1)
        self.generator = torch.Generator().manual_seed(seed)

    def captions(self, labels: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] of one random template per label."""
        which = torch.randint(self.tokens.shape[0], (len(labels),), generator=self.generator)
        return self.tokens[which, labels.cpu()]

    def __call__(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        texts = self.captions(labels).to(images.device)
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(texts), dim=-1)
        return clip_loss(image_features, text_features, model.logit_scale.exp())


def flyp_classifier(ctx: MethodContext, opts: FlypOptions) -> Classifier:
    """Contrastively fine-tune a copy of the CLIP model, then build its zero-shot classifier."""
    ref = get_dataset(ctx.suite.reference)
    model = copy.deepcopy(ctx.clip.model)  # ctx.clip stays the pretrained model
    for p in model.parameters():
        p.requires_grad_(True)
    loss_fn = CaptionedContrastiveLoss(ctx.clip.tokenizer, list(ref.classnames), list(ref.templates), ctx.config.seed)
    summary = train(model, training_batches(ctx, opts.batch_size), opts.optim_config(train_samples(ctx)), loss_fn,
                    device=ctx.clip.device, precision=ctx.config.precision, progress=ctx.progress,
                    desc="FLYP fine-tuning")
    finetuned = replace(ctx.clip, model=model.eval())
    return Classifier.zeroshot(finetuned, ref.classnames, ref.templates, provenance={
        "model": ctx.clip.name, "method": "flyp", "training": summary,
        "logit_scale": float(model.logit_scale.detach().exp())})


@register_method("flyp", paper="Goyal et al., Finetune like you pretrain: Improved finetuning of zero-shot vision "
                 "models, CVPR 2023")
class Flyp:
    """Contrastive fine-tuning of both towers on template captions; head rebuilt from the fine-tuned text tower."""

    options = FlypOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        torch.manual_seed(ctx.config.seed)
        model = ctx.cached_classifier(lambda: flyp_classifier(ctx, ctx.options))
        return [Candidate("flyp", model, {"endpoint": "finetuned", "alpha": 1.0, "base": "flyp"})]
