"""Function-space regularisation, an *interpretation* of Yuan, Shu, Meng & Xu, "Feed Two Birds with One Scone:
Exploiting Function-Space Regularization for Both OOD Robustness and ID Fine-Tuning Performance"
(arXiv 2509.05328, 31 Aug 2025).

Only the paper's abstract could be read (no body, no code in any corpus searched: research notes
``ensembles_losses.md`` §3 and this issue's own look-ups). The abstract says the method "constrains
the distance of fine-tuning and pre-trained model in the function space with the simulated OOD
samples" and adds "an additional consistency regularization to promote stable predictions of
perturbed samples". This module implements the formulation of the project's METHODS.md §7:

    L = CE(f_θ(x), y) + λ_f·KL(p_θ₀(x̃₁) ‖ p_θ(x̃₁)) + λ_c·JS(p_θ(x̃₁), p_θ(x̃₂))

with these **assumptions**, none from the paper:

* f_θ is the classifier being fine-tuned (image encoder + head, the head starting as the zero-shot
  head, as ``finetune``), f_θ₀ the frozen zero-shot classifier; p = softmax of their logits (the
  CLIP temperature is already in the head; no extra temperature).
* The simulated OOD view S(x) of a training image (already train-transformed and normalised) is a
  per-sample colour shift and noise: x̃ = g ⊙ x + o + σ·ε with per-channel gain g ~ U[1−s, 1+s],
  per-channel offset o ~ U[−s, s], noise level σ ~ U[0, s] and ε ~ N(0, I), s = ``ood_strength``
  (0.5). Every draw comes from the sample's own seed and the view's index, so views are the same for
  any worker count, rank split, micro-batch split or resume.
* D is the KL divergence from the pre-trained model's prediction to the fine-tuned one's; the
  consistency divergence D′ is the Jensen–Shannon divergence between the two views' predictions
  (symmetric, 0 for identical views).
* λ_f = λ_c = 1 (no published value was found).

With λ_f = λ_c = 0 this is ``finetune`` exactly (the same loss, no extra pass); at θ = θ₀ the
function term and its gradient are 0. Cost: one forward/backward of the trainable model on [x, x̃₁,
x̃₂] (3× the images) plus a frozen forward on x̃₁, about 3-4× ``finetune`` per step (measured in
``benchmarks/method_cost.py``).
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.finetune import FinetuneOptions, finetune_classifier
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.training import Batch, LossFn, cross_entropy
from robustbench_ft.models.classifier import Classifier


@dataclass(frozen=True)
class FsrOptions(FinetuneOptions):
    lambda_f: float = 1.0      # weight of the function-space term (assumption: no published value found)
    lambda_c: float = 1.0      # weight of the consistency term (assumption: no published value found)
    ood_strength: float = 0.5  # s of the simulated-OOD colour shift and noise (assumption)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lambda_f < 0 or self.lambda_c < 0 or self.ood_strength < 0:
            raise ValueError(f"fsr: lambda_f, lambda_c and ood_strength must be >= 0; got {self.lambda_f}, "
                             f"{self.lambda_c}, {self.ood_strength}")


def view_seed(sample_seed: int, view: int) -> int:
    """A 63-bit seed for view ``view`` of a sample: a function of the sample's seed alone."""
    digest = hashlib.blake2b(f"fsr/{sample_seed}/{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def simulated_ood(images: torch.Tensor, seeds: torch.Tensor, view: int, strength: float) -> torch.Tensor:
    """x̃ = g ⊙ x + o + σ·ε per sample (see the module docstring), each sample drawn from its own seed.

    g, o and σ are drawn on the CPU, ε on the images' device (so a GPU run does not generate its noise on
    the CPU); the views are a function of the seeds alone on a given device type.
    """
    out = torch.empty_like(images)
    channels = images.shape[1]
    for i, seed in enumerate(seeds.tolist()):
        seed = view_seed(seed, view)
        gen = torch.Generator().manual_seed(seed)
        gain = 1 + strength * (2 * torch.rand(channels, 1, 1, generator=gen) - 1)
        offset = strength * (2 * torch.rand(channels, 1, 1, generator=gen) - 1)
        sigma = float(strength * torch.rand((), generator=gen))
        noise = torch.randn(images.shape[1:], generator=torch.Generator(images.device).manual_seed(seed),
                            device=images.device, dtype=images.dtype)
        out[i] = gain.to(images.device, images.dtype) * images[i] + offset.to(images.device, images.dtype) + sigma * noise
    return out


def kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(reference) ‖ softmax(logits))."""
    ref = F.log_softmax(reference_logits.float(), dim=1)
    return (ref.exp() * (ref - F.log_softmax(logits.float(), dim=1))).sum(dim=1).mean()


def jensen_shannon(a_logits: torch.Tensor, b_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of JS(p_a, p_b) = ½KL(p_a ‖ m) + ½KL(p_b ‖ m), m = (p_a + p_b)/2 (0·log 0 = 0)."""
    pa, pb = F.softmax(a_logits.float(), dim=1), F.softmax(b_logits.float(), dim=1)
    m = (pa + pb) / 2
    xlogy = torch.special.xlogy
    return 0.5 * (xlogy(pa, pa) - xlogy(pa, m) + xlogy(pb, pb) - xlogy(pb, m)).sum(dim=1).mean()


def fsr_loss(reference: Classifier, opts: FsrOptions) -> LossFn:
    """The per-(micro-)batch loss: CE on x, plus the two terms on the simulated-OOD views when weighted."""
    ce = cross_entropy(opts.label_smoothing)
    if opts.lambda_f == 0 and opts.lambda_c == 0:
        return ce  # finetune exactly
    frozen = copy.deepcopy(reference).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)

    def loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        n = len(batch.labels)
        count = 2 if opts.lambda_c > 0 else 1
        views = [simulated_ood(batch.images, batch.seeds, v, opts.ood_strength) for v in range(1, count + 1)]
        logits = model(torch.cat([batch.images, *views]))
        total = F.cross_entropy(logits[:n], batch.labels, label_smoothing=opts.label_smoothing)
        if opts.lambda_f > 0:
            if next(frozen.parameters()).device != batch.images.device:
                frozen.to(batch.images.device)
            with torch.no_grad():
                reference_logits = frozen(views[0])
            total = total + opts.lambda_f * kl(reference_logits, logits[n:2 * n])
        if opts.lambda_c > 0:
            total = total + opts.lambda_c * jensen_shannon(logits[n:2 * n], logits[2 * n:])
        return total

    return loss


def function_term(model: Classifier, reference: Classifier, batch: Batch, strength: float) -> torch.Tensor:
    """KL(p_θ₀(x̃₁) ‖ p_θ(x̃₁)) on a batch's first simulated-OOD view (what λ_f weighs; for tests and probes)."""
    view = simulated_ood(batch.images, batch.seeds, 1, strength)
    with torch.no_grad():
        reference_logits = reference(view)
    return kl(reference_logits, model(view))


@register_method("fsr", paper="Yuan, Shu, Meng & Xu, Feed Two Birds with One Scone: Exploiting Function-Space "
                 "Regularization for Both OOD Robustness and ID Fine-Tuning Performance, arXiv 2509.05328 "
                 "(interpretation: the paper's body was not found)")
class FunctionSpaceRegularisation:
    """Fine-tuning with a KL pull towards the zero-shot function on simulated-OOD views, plus view consistency."""

    options = FsrOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: FsrOptions = ctx.options

        def train() -> Classifier:
            model = finetune_classifier(ctx, ctx.zeroshot, opts, "fsr fine-tuning", loss=fsr_loss(ctx.zeroshot, opts))
            model.info.provenance["fsr"] = {"lambda_f": opts.lambda_f, "lambda_c": opts.lambda_c,
                                            "ood_strength": opts.ood_strength, "interpretation": "METHODS.md §7"}
            return model

        return ctx.trained_endpoint(train, extra={"interpretation": "METHODS.md §7; the paper's body was not found"})
