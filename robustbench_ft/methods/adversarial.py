"""Adversarial fine-tuning: PGD adversarial training and TRADES, full fine-tuning or linear probe.

* ``pgd-at``: Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018: minimise CE(f(x'), y), x' = PGD maximiser of the CE in the ℓ∞ ball of radius ε.
* ``trades``: Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off between Robustness
  and Accuracy", ICML 2019: minimise CE(f(x), y) + β·KL(softmax f(x) ‖ softmax f(x')), x' maximising that KL
  (``inner_loss="kl"``, the paper's definition, started at x + 0.001·N(0, I) as in its code) or the CE
  (``inner_loss="ce"``, as Heuillet et al.'s ``losses/trades.py`` does: their x' comes from the CE attack).

Defaults are Heuillet et al.'s ("A Guide to Robust Generalization...", arXiv 2508.14079; MaxHeuillet/robust_training
@ 4c886c1 ``configs/default_config_*.yaml``): ℓ∞ ε = 0.015686275 (4/255), step 0.007843137 (2/255), 10 steps, no
random start (``use_rs: False``), TRADES β = 1.0; ``mode`` = full fine-tuning or linear probe (``ft_type:
linear_probing``: the head alone is trained; the attack still goes through the whole model). The schedule
(AdamW, warmup, cosine) is ``finetune``'s recipe: Heuillet et al. tuned lr / weight decay per configuration by HPO
(Ray Tune, 3 trials), with no single default to copy.

Departures, written down: (1) the inner maximiser is PGD with sign steps of 2/255 (Madry et al.), whereas
Heuillet et al.'s code runs APGD-CE for 10 iterations (``corruptions/apgd.py``, initial step 2ε, so their
``step_size`` is unused); (2) the perturbation is made in [0, 1] pixels of the train-transformed image (the
transform's Normalize undone, the ball intersected with [0, 1], then normalised again), as their model
normalises inside its forward; (3) examples are crafted with the model in eval mode (TRADES' code does so;
CLIP's encoders have no dropout or batch norm, so the two modes agree) and without parameter gradients.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from robustbench_ft import distributed
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.finetune import FinetuneOptions, run_training
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.training import Batch, mean_loss
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.perturbations.attack import frozen_eval
from robustbench_ft.perturbations.evaluate import split_normalize

HEUILLET = ("Heuillet et al. arXiv 2508.14079, MaxHeuillet/robust_training @ 4c886c1 configs/default_config_*.yaml: "
            "l-inf eps 4/255, step 2/255, 10 steps, no random start; TRADES beta 1.0; schedule: finetune's recipe")


@dataclass(frozen=True)
class AdversarialOptions(FinetuneOptions):
    eps: float = 4 / 255              # ℓ∞ radius in [0, 1] pixels (Heuillet et al.: 0.015686275)
    step_size: float = 2 / 255        # PGD step (Heuillet et al.: 0.007843137)
    steps: int = 10                   # PGD steps (Heuillet et al.: perturb_steps 10)
    random_start: bool = False        # uniform start in the ball (Heuillet et al.: use_rs False)
    mode: Literal["full", "linear-probe"] = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.eps < 1 and self.step_size > 0 and self.steps >= 1):
            raise ValueError(f"adversarial training: eps must lie in (0, 1) (pixel units: 4/255), step_size > 0 and "
                             f"steps >= 1; got {self.eps}, {self.step_size}, {self.steps}")


@dataclass(frozen=True)
class TradesOptions(AdversarialOptions):
    beta: float = 1.0                 # weight of the KL term (Heuillet et al.: beta 1.0)
    inner_loss: Literal["kl", "ce"] = "kl"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"trades: beta must be >= 0, got {self.beta}")


class PixelBall:
    """Moves between normalised model inputs and [0, 1] pixels, and projects onto the ℓ∞ ball ∩ [0, 1]."""

    def __init__(self, transform, device: torch.device):
        _, mean, std = split_normalize(transform)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def normalise(self, p: torch.Tensor) -> torch.Tensor:
        return (p - self.mean) / self.std

    @staticmethod
    def project(p: torch.Tensor, p0: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.min(torch.max(p, p0 - eps), p0 + eps).clamp(0.0, 1.0)


def pgd(model: torch.nn.Module, ball: PixelBall, images: torch.Tensor, loss_of, opts: AdversarialOptions,
        start: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised inputs x' maximising ``loss_of(logits)`` by ℓ∞ PGD in pixels (``start``: pixels to begin at)."""
    p0 = ball.pixels(images).detach().clamp(0.0, 1.0)
    p = p0.clone() if start is None else ball.project(start, p0, opts.eps)
    with frozen_eval(model), torch.autocast(images.device.type, enabled=False):
        for _ in range(opts.steps):
            p.requires_grad_(True)
            grad, = torch.autograd.grad(loss_of(model(ball.normalise(p))), p)
            p = ball.project(p.detach() + opts.step_size * grad.sign(), p0, opts.eps)
    return ball.normalise(p.detach())


def start_pixels(batch: Batch, ball: PixelBall, kind: str, eps: float) -> torch.Tensor:
    """Where PGD starts, in pixels: x + U(−ε, ε) (``kind="uniform"``, Madry et al.'s random start) or
    x + 0.001·N(0, I) (``"trades"``, TRADES' code), drawn from each sample's own seed (``Batch.seeds``), so the
    draws are the same for any workers, ranks, micro-batching or resume."""
    draws = []
    for seed in batch.seeds.tolist():
        gen = torch.Generator().manual_seed(int(seed))
        shape = batch.images.shape[1:]
        draws.append(torch.rand(shape, generator=gen) * 2 * eps - eps if kind == "uniform" else
                     0.001 * torch.randn(shape, generator=gen))
    return ball.pixels(batch.images) + torch.stack(draws).to(batch.images.device)


def pgd_at_loss(ball: PixelBall, opts: AdversarialOptions):
    def loss(model: torch.nn.Module, batch: Batch, start: torch.Tensor | None = None) -> torch.Tensor:
        inner = distributed.unwrap(model)
        adv = pgd(inner, ball, batch.images, lambda z: F.cross_entropy(z, batch.labels), opts, start)
        return F.cross_entropy(model(adv), batch.labels, label_smoothing=opts.label_smoothing)
    return loss


def trades_loss(ball: PixelBall, opts: TradesOptions):
    def loss(model: torch.nn.Module, batch: Batch, start: torch.Tensor | None = None) -> torch.Tensor:
        inner = distributed.unwrap(model)
        with torch.no_grad(), frozen_eval(inner):
            clean_p = F.softmax(inner(batch.images).float(), dim=1)

        def kl(z: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(z, dim=1), clean_p, reduction="batchmean")

        inner_loss = kl if opts.inner_loss == "kl" else (lambda z: F.cross_entropy(z, batch.labels))
        adv = pgd(inner, ball, batch.images, inner_loss, opts, start)
        logits = model(batch.images)
        robust = F.kl_div(F.log_softmax(model(adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, batch.labels, label_smoothing=opts.label_smoothing) + opts.beta * robust
    return loss


def adversarial_classifier(ctx: MethodContext, start: Classifier, opts: AdversarialOptions, make_loss,
                           desc: str, trades_start: bool = False) -> Classifier:
    """A copy of ``start`` trained with an adversarial loss; every parameter, or the head alone (linear probe)."""
    model = copy.deepcopy(start).to(ctx.clip.device)
    for p in model.parameters():
        p.requires_grad_(opts.mode == "full")
    model.head.requires_grad_(True)
    ball = PixelBall(ctx.clip.preprocess_train, ctx.clip.device)
    loss = make_loss(ball, opts)
    kind = "uniform" if opts.random_start else "trades" if trades_start else None

    def per_batch(m: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return loss(m, batch, None if kind is None else start_pixels(batch, ball, kind, opts.eps))

    summary = run_training(ctx, model, opts, mean_loss(per_batch), desc)
    model.info.provenance.update({"training": summary})
    return model


def _candidate(name: str, ctx: MethodContext, make_loss, trades_start: bool) -> list[Candidate]:
    torch.manual_seed(ctx.config.seed)
    model = ctx.cached_classifier(lambda: adversarial_classifier(ctx, ctx.zeroshot, ctx.options, make_loss,
                                                                 f"{name} ({ctx.options.mode})", trades_start))
    return [Candidate(name, model, alpha=1.0, endpoint="finetuned", base=name)]


@register_method("pgd-at", paper="Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR "
                 "2018 (as benchmarked by Heuillet et al., arXiv 2508.14079, 2025)", defaults=HEUILLET)
class PgdAT:
    """PGD adversarial training (ℓ∞): cross-entropy on PGD examples; full fine-tune or linear probe."""

    options = AdversarialOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        return _candidate("pgd-at", ctx, pgd_at_loss, trades_start=False)


@register_method("trades", paper="Zhang et al., Theoretically Principled Trade-off between Robustness and Accuracy, "
                 "ICML 2019 (as benchmarked by Heuillet et al., arXiv 2508.14079, 2025)", defaults=HEUILLET)
class Trades:
    """TRADES: clean cross-entropy + β·KL(clean ‖ adversarial); full fine-tune or linear probe."""

    options = TradesOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        return _candidate("trades", ctx, trades_loss,
                          trades_start=ctx.options.inner_loss == "kl" and not ctx.options.random_start)
