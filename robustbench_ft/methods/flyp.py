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

Ablations (options of this method; the defaults are the released recipe). The FLYP paper's ablation
section was not found (research notes, ``ensembles_losses.md`` §7), so each one is defined by what the
authors' code (locuslab/FLYP @ 215d5bb) implements, or, where the code has nothing, as written here:

* ``--loss ce``: the code's ``--ce_ablation`` (``src/models/ce_ablation.py``): cross-entropy over
  *all* classes with the text-derived head, ``logit_scale.exp()·f(x)·g_cᵀ``, where each step draws one
  template per class (the same draw for every micro-batch and rank: :meth:`Step.generator`) and
  encodes the C prompts with the trainable text tower.
* ``--collisions``: what a batch does with two images of one class. ``negatives`` (default) is the
  released recipe: plain in-batch CLIP loss, the other same-class caption is a negative. The code's
  ``clip/loss.py`` ``ClipLoss.forward`` also defines three label-aware variants that no training script
  calls: ``ignore`` (``ignore=True``: same-class entries other than the pair leave each row's softmax),
  ``soft`` (the ``ground_labels`` default: soft targets spread uniformly over the row's same-class
  entries) and ``supcon`` (``google_sup_loss=True``: per same-class entry j, −log(e_ij / (Σ_k e_ik − e_ij)),
  averaged over the row's same-class entries, as the code computes it).
* ``--train-text false``: the text tower frozen (every parameter outside ``visual`` except the
  temperature). The code has no such flag (its ``--freeze-encoder`` freezes the *image* encoder);
  this is the issue's definition, not the paper's.
* ``--prompts fixed``: every caption (and, with ``--loss ce``, every class prompt) uses the first
  template of the reference dataset. The code has no such flag; its ImageNet CSV has one row per
  (image, template), so the recipe samples templates (``sampled``, the default).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from robustbench_ft import distributed
from robustbench_ft.datasets.registry import get_dataset
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.finetune import ScheduleOptions, run_training
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.training import Batch, Objective, Step
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.models.zeroshot import fill_template

Collisions = Literal["negatives", "ignore", "soft", "supcon"]


@dataclass(frozen=True)
class FlypOptions(ScheduleOptions):
    lr: float = 1e-5
    grad_clip: float = 0.0   # the FLYP code does not clip gradients
    loss: Literal["contrastive", "ce"] = "contrastive"  # "ce": the code's --ce_ablation (text-derived head)
    collisions: Collisions = "negatives"  # same-class pairs in a batch: negatives (the recipe) | ignore | soft | supcon
    train_text: bool = True               # false: the text tower stays frozen (ablation; no flag in the code)
    prompts: Literal["sampled", "fixed"] = "sampled"  # "fixed": the first template for every caption (ablation)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss == "ce" and self.collisions != "negatives":
            raise ValueError(f"flyp: --collisions {self.collisions} applies to the contrastive loss; with --loss ce "
                             "every class is in the softmax once (drop --collisions)")


_CLIP_LOSS = ClipLoss()  # open_clip's, on one process: the features it gets are already gathered


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3) for a batch of N matching pairs: open_clip's
    ``ClipLoss`` on L2-normalised [N, D] features, ``logit_scale`` = exp(t). Row i of each is a positive
    pair, every other row a negative (the mean of the image→text and text→image cross-entropies)."""
    return _CLIP_LOSS(image_features, text_features, logit_scale)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     labels: torch.Tensor | None = None, collisions: Collisions = "negatives") -> torch.Tensor:
    """The in-batch contrastive loss with same-class pairs treated as FLYP's ``ClipLoss`` variants do
    (see the module docstring); ``negatives`` is :func:`clip_loss` itself."""
    if collisions == "negatives":
        return clip_loss(image_features, text_features, logit_scale)
    if labels is None:
        raise ValueError(f"collisions={collisions!r} needs the batch's class labels")
    per_image = logit_scale * image_features @ text_features.T
    per_text = logit_scale * text_features @ image_features.T
    same = (labels.view(-1, 1) == labels.view(1, -1)).to(per_image.dtype)
    if collisions == "soft":
        target = same / same.sum(dim=1, keepdim=True)
        return (F.cross_entropy(per_image, target) + F.cross_entropy(per_text, target)) / 2
    if collisions == "ignore":
        dropped = (same - torch.eye(len(same), device=same.device, dtype=same.dtype)).bool()

        def nll(logits: torch.Tensor) -> torch.Tensor:
            return (logits.masked_fill(dropped, float("-inf")).logsumexp(dim=1) - logits.diagonal()).mean()

        return (nll(per_image) + nll(per_text)) / 2

    def supcon(logits: torch.Tensor) -> torch.Tensor:  # google_sup_loss, computed as the code does
        e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        nll = -torch.log(e / (e.sum(dim=1, keepdim=True) - e))
        return ((nll * same).sum(dim=1) / same.sum(dim=1)).mean()

    return (supcon(per_image) + supcon(per_text)) / 2


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


def require_text_tower(model: torch.nn.Module, method: str) -> None:
    """One clear line when a method that trains CLIP's text tower gets a model without one."""
    if not callable(getattr(model, "encode_text", None)):
        raise ValueError(f"{method} trains CLIP's text tower with a contrastive loss, but this model "
                         f"({type(model).__name__}) has no text tower (no encode_text); use a CLIP model (--model), "
                         "or a method that trains the image encoder only (finetune, fsr, l2-sp)")


def is_text_parameter(name: str) -> bool:
    """Whether a CLIP parameter belongs to the text tower: everything outside ``visual`` but the temperature."""
    return not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")


def prompt_table(tokenizer, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """``tokens[t, c]``: template t filled with class c, tokenised once up front ([T, C, L])."""
    texts = [fill_template(template, name) for template in templates for name in classnames]
    return tokenizer(texts).view(len(templates), len(classnames), -1)


class CaptionedContrastiveLoss:
    """FLYP's objective for a CLIP model and a batch of (images, class labels): captions from random templates.

    The template of each image is its seed modulo the number of templates (a uniform draw, fixed by the
    sample's seed), or the first template with ``prompts="fixed"``. See the module docstring for
    accumulation and DDP. Variants of the objective (m²-mix, CaRot) override three hooks, and inherit
    the accumulation and DDP handling: :meth:`prepare` (per-step state, once per step),
    :meth:`batch_loss` (the loss of the whole gathered batch, any function of its features) and
    :meth:`penalty` (a term that does not depend on the batch, counted once per step).
    """

    def __init__(self, tokenizer, classnames: list[str], templates: list[str], *,
                 collisions: Collisions = "negatives", prompts: str = "sampled"):
        self.tokens = prompt_table(tokenizer, classnames, templates)
        self.collisions = collisions
        self.prompts = prompts

    def captions(self, labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] of one template per label, drawn by the sample seeds."""
        labels = labels.cpu()
        template = seeds.cpu() % self.tokens.shape[0] if self.prompts == "sampled" else torch.zeros_like(labels)
        return self.tokens[template, labels]

    def prepare(self, step: Step, batch: Batch, texts: torch.Tensor) -> Any:
        """Per-step state shared by every micro-batch (none for FLYP)."""
        return None

    def batch_loss(self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
                   labels: torch.Tensor | None, state: Any, step: Step) -> torch.Tensor:
        """The loss of the whole (gathered) batch; only the micro-batch's own rows carry gradient."""
        return contrastive_loss(image_features, text_features, scale, labels, self.collisions)

    def penalty(self, model: torch.nn.Module, step: Step) -> torch.Tensor | None:
        """A batch-independent term of the step's loss (none for FLYP)."""
        return None

    def __call__(self, step: Step, batch: Batch) -> float:
        texts = self.captions(batch.labels, batch.seeds).to(batch.images.device)
        state = self.prepare(step, batch, texts)
        labels = None if self.collisions == "negatives" else distributed.all_gather_tensor(batch.labels)
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
                    loss = self.batch_loss(image_features, text_features, scale, labels, state, step)
                    extra = self.penalty(distributed.unwrap(step.model), step) if last else None
                    if extra is not None:  # once per step: this rank's share of DDP's average
                        loss = loss + scale_grad(extra, 1 / world.world_size)
                (loss * world.world_size).backward()
            start = end
        return loss.item()


class TextHeadCrossEntropy:
    """FLYP's cross-entropy ablation (the code's ``--ce_ablation``): CE over all classes with the head
    ``logit_scale.exp()·g_c`` from the trainable text tower, one template per class drawn each step.

    A mean over samples: micro-batch i of n_i samples counts n_i/n (the text prompts are encoded again
    for each micro-batch, with the step's one draw), and DDP's gradient average is the global mean.
    """

    def __init__(self, tokenizer, classnames: list[str], templates: list[str], *, prompts: str = "sampled"):
        self.tokens = prompt_table(tokenizer, classnames, templates)
        self.prompts = prompts

    def class_prompts(self, step: Step) -> torch.Tensor:
        """Token ids [C, L]: one template per class, drawn from the step's generator (or the first)."""
        n_templates, n_classes = self.tokens.shape[:2]
        if self.prompts == "sampled":
            template = torch.randint(0, n_templates, (n_classes,), generator=step.generator())
        else:
            template = torch.zeros(n_classes, dtype=torch.long)
        return self.tokens[template, torch.arange(n_classes)]

    def __call__(self, step: Step, batch: Batch) -> float:
        prompts = self.class_prompts(step).to(batch.images.device)
        micro = batch.split(step.accum_steps)
        total = 0.0
        for i, part in enumerate(micro):
            with step.sync(last=i == len(micro) - 1):
                with step.autocast():
                    image_features, text_features, scale = clip_features(step.model, part.images, prompts)
                    logits = scale * image_features @ text_features.T
                    loss = F.cross_entropy(logits, part.labels) * (len(part.labels) / len(batch.labels))
                loss.backward()
            total += loss.item()
        return total


def flyp_objective(ctx: MethodContext, opts: FlypOptions) -> Objective:
    """FLYP's objective for these options: the contrastive loss (default) or the CE ablation."""
    ref = get_dataset(ctx.suite.reference)
    args = (ctx.clip.tokenizer, list(ref.classnames), list(ref.templates))
    if opts.loss == "ce":
        return TextHeadCrossEntropy(*args, prompts=opts.prompts)
    return CaptionedContrastiveLoss(*args, collisions=opts.collisions, prompts=opts.prompts)


def flyp_classifier(ctx: MethodContext, opts: FlypOptions, objective: Objective | None = None, *,
                    method: str = "flyp", wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                    provenance: dict[str, Any] | None = None) -> Classifier:
    """Contrastively fine-tune a copy of the CLIP model, then build its zero-shot classifier.

    ``objective`` replaces FLYP's (m²-mix, CaRot build theirs on :class:`CaptionedContrastiveLoss`);
    ``wrap`` puts the copy inside a module that is trained in its place (CaRot's student and EMA
    teacher, so that a resumable state holds the teacher too); ``provenance`` is added to the result's.
    """
    require_text_tower(ctx.clip.model, method)
    ref = get_dataset(ctx.suite.reference)
    model = copy.deepcopy(ctx.clip.model)  # ctx.clip stays the pretrained model
    for name, p in model.named_parameters():
        p.requires_grad_(opts.train_text or not is_text_parameter(name))
    objective = objective if objective is not None else flyp_objective(ctx, opts)
    summary = run_training(ctx, model if wrap is None else wrap(model), opts, objective, f"{method} fine-tuning")
    finetuned = replace(ctx.clip, model=model.eval())
    return Classifier.zeroshot(finetuned, ref.classnames, ref.templates, provenance={
        "model": ctx.clip.name, "method": method, "training": summary,
        "logit_scale": float(model.logit_scale.detach().exp()), **(provenance or {})})


@register_method("flyp", paper="Goyal et al., Finetune like you pretrain: Improved finetuning of zero-shot vision "
                 "models, CVPR 2023",
                 defaults="FLYP README ImageNet command (locuslab/FLYP @ 215d5bb): lr 1e-5, wd 0.1, batch 512, 10 epochs, "
                          "500 warmup steps (src/args.py), no gradient clipping")
class Flyp:
    """Contrastive fine-tuning of both towers on template captions; head rebuilt from the fine-tuned text tower."""

    options = FlypOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        return ctx.trained_endpoint(lambda: flyp_classifier(ctx, ctx.options))
