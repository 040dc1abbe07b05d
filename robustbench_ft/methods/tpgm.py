"""TPGM (Tian, Dai, Ma, He, Liu & Kira, Trainable Projected Gradient Method for Robust Fine-Tuning, CVPR 2023,
arXiv:2303.10720).

Every tensor of the fine-tuned model is pulled back towards its pre-trained value θ₀ by a learned
radius γ_l: θ_l(γ) = θ₀,l + α_l·Δ_l with Δ_l = θ_l − θ₀,l and α_l = hardtanh(γ_l/(n_l + 1e-8), 0, 1),
where n_l = ‖Δ_l‖₂ (``--norm-mode l2``, one number per tensor) or the L1 norm of each row of Δ_l
(``mars``: Σ|Δ[r, …]| over every dim but the first, no eps inside). The radii are trained by Adam
on the cross-entropy of the projected model, in eval mode, on batches of the suite's **val split
only**. Before each use γ_l is clamped to [1e-8, max n_l]; at its first use γ_l = min(n_l)/2, so in
L2 mode α_l = 0.5 for every tensor: **TPGM starts at WiSE-FT α = 0.5**. Written from the authors'
code, PotatoTian/TPGM ``utils/tpgm.py`` at commit 8d18db0 (byte-identical in its two experiments), as
``/work/shared/METHODS.md`` §2 and ``projection.md`` §2 give it. Two modes:

* ``--mode post-hoc`` (the code's ``ImageNet_ViT_Exp``, used for CLIP ViT-B/16 on ImageNet): over any
  fine-tuned endpoint (``--base finetune|flyp|lp-ft|l2-sp|…`` or ``--finetuned PATH``, as WiSE-FT takes
  it), ``iterations`` = 200 Adam steps (lr ``--radius-lr`` 1e-2, torch's betas/eps) on shuffled val batches
  of 64 (cycling), L2 norms, every tensor projected, the head included (``exclude_list=[]``: θ₀ is CLIP
  with the zero-shot head), then the projected weights are written into the result. The radii are
  applied with ``torch.func.functional_call`` on one eval-mode copy, not a deep copy per iteration.
* ``--mode per-step`` (the code's ``DomainNet_ResNet_Exp``): fine-tuning with ``finetune``'s recipe (its
  options through ``--base finetune`` and the suite's defaults; AdamW here, where the code used SGD with
  Nesterov momentum), and after every optimizer step ``iterations`` = 1 radius update on the next val
  batch (every ``--every`` = 1 steps, the code's ``proj_freq``), then the live model is projected with
  the current radii (MARS norms by default, as the DomainNet code). The radii, their Adam moments and
  the position in the val stream are in the optimizer's state, so a killed run resumes bit-exactly.
  Under DDP every rank computes the same radius update on the same whole val batch.

Departures: θ₀ is the harness's zero-shot classifier (visual tower + ``logit_scale·W_zs`` head, which
has a bias; TPGM's head has none); a tensor with Δ = 0 is left alone (its n is 0, and the code's clamp
to [1e-8, 0] has no meaning); the ImageNet script trains the radii on the same ``val.json`` it reports
as ImageNet accuracy (projection.md §2.2: a leak), whereas here they see the suite's val split,
carved from training data, and nothing else; the code's ``DataParallel`` batch of 64 is the global
batch here too. ``--project-head`` off reproduces the DomainNet code's exclusion of its (random) head.
"""
from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call

from robustbench_ft.loading.training_batches import step_seed
from robustbench_ft.methods.anchored import AnchoredAdam, anchor_tensors, check_range, row_sum, scalar_adam
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.finetune import FinetuneOptions, run_training
from robustbench_ft.methods.registry import METHOD_ALIASES, register_method
from robustbench_ft.methods.training import NamedParameters, OptimConfig, OptimizerFactory, cross_entropy, mean_loss
from robustbench_ft.methods.wise_ft import finetuned_endpoint
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.models.clip import autocast
from robustbench_ft.shards.manifest import Manifest

MIN_RADIUS = 1e-8  # lower clamp of γ (utils/tpgm.py)
RATIO_EPS = 1e-8   # in α's denominator (utils/tpgm.py)
NormMode = Literal["l2", "mars"]
# mode -> (iterations, norm mode) of the authors' two experiments (ImageNet_ViT_Exp and DomainNet_ResNet_Exp
# main_finetune.py defaults, which their README commands keep)
MODE_DEFAULTS: dict[str, tuple[int, NormMode]] = {"post-hoc": (200, "l2"), "per-step": (1, "mars")}


@dataclass(frozen=True)
class TPGMOptions:
    mode: Literal["post-hoc", "per-step"] = "post-hoc"
    iterations: int | None = None        # radius updates: post-hoc in all (200), per-step per projection step (1)
    radius_lr: float = 1e-2              # Adam learning rate of the radii (--proj_lr)
    val_batch_size: int = 64             # val batch of each radius update (--batch_size, the global batch)
    norm_mode: NormMode | None = None    # "l2" (whole tensor) or "mars" (row L1); none: l2 post-hoc, mars per-step
    every: int = 1                       # per-step: update the radii every N optimizer steps (--proj_freq)
    project_head: bool = True            # project the zero-shot head too (ImageNet code: exclude_list=[])
    base: str = "finetune"               # post-hoc: method giving the fine-tuned endpoint; per-step: its recipe
    finetuned: str | None = None         # post-hoc: a checkpoint as the fine-tuned endpoint instead
    base_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", METHOD_ALIASES.get(self.base, self.base))
        check_range("tpgm", "radius_lr", self.radius_lr, 0.0)
        if self.iterations is not None and self.iterations < 0:
            raise ValueError(f"tpgm: iterations must be >= 0, got {self.iterations}")
        if self.val_batch_size < 1 or self.every < 1:
            raise ValueError(f"tpgm: val_batch_size and every must be >= 1, got {self.val_batch_size} and {self.every}")
        if self.mode == "per-step" and (self.base != "finetune" or self.finetuned):
            raise ValueError("tpgm --mode per-step fine-tunes from the zero-shot model with finetune's recipe: use "
                             "--base finetune and no --finetuned (post-hoc mode takes any endpoint)")

    @property
    def steps(self) -> int:
        return MODE_DEFAULTS[self.mode][0] if self.iterations is None else self.iterations

    @property
    def norm(self) -> NormMode:
        return self.norm_mode or MODE_DEFAULTS[self.mode][1]


# --------------------------------------------------------------------------- the projection


def displacement_norm(delta: torch.Tensor, mode: NormMode) -> torch.Tensor:
    """n_l: ‖Δ‖₂ (a 0-d tensor) in L2 mode, else the L1 norm of each row (``row_sum``)."""
    return torch.linalg.vector_norm(delta) if mode == "l2" else row_sum(delta.abs())


def clamp_radius(gamma: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """hardtanh(γ, 1e-8, max n), done before every use."""
    return torch.minimum(torch.clamp(gamma, min=MIN_RADIUS), norm.max())


def ratio(gamma: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """α = hardtanh(γ/(n + 1e-8), 0, 1): differentiable in γ (zero gradient where it saturates)."""
    return F.hardtanh(gamma / (norm + RATIO_EPS), 0.0, 1.0)


@dataclass
class Projection:
    """θ₀ and Δ of the projected tensors (by parameter name) with their norms; ``params(radii)`` is θ₀ + α(γ)Δ."""

    anchors: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor]

    @classmethod
    def between(cls, anchors: dict[str, torch.Tensor], current: dict[str, torch.Tensor], mode: NormMode) -> Projection:
        """Over the tensors of ``anchors`` that moved (Δ = 0 has nothing to project)."""
        deltas = {n: current[n].detach() - a for n, a in anchors.items()}
        deltas = {n: d for n, d in deltas.items() if bool(d.any())}
        return cls({n: anchors[n] for n in deltas}, deltas, {n: displacement_norm(d, mode) for n, d in deltas.items()})

    def initial_radii(self) -> dict[str, torch.Tensor]:
        """min(n_l)/2 for every tensor (in L2 mode: α = 0.5, WiSE-FT's midpoint)."""
        return {n: norm.min() / 2 for n, norm in self.norms.items()}

    def clamp(self, radii: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: clamp_radius(g, self.norms[n]) for n, g in radii.items()}

    def params(self, radii: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self.anchors[n] + ratio(radii[n], self.norms[n]) * self.deltas[n] for n in self.deltas}

    def loss(self, model: torch.nn.Module, radii: dict[str, torch.Tensor], images: torch.Tensor,
             labels: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Cross-entropy of ``model`` (in eval mode) with the projected tensors substituted."""
        with autocast(images.device, precision):
            return F.cross_entropy(functional_call(model, self.params(radii), (images,)), labels)

    def radius_grads(self, model: torch.nn.Module, radii: dict[str, torch.Tensor], images: torch.Tensor,
                     labels: torch.Tensor, precision: str = "fp32") -> tuple[float, dict[str, torch.Tensor]]:
        """(loss, ∂loss/∂γ_l for every tensor) at the clamped ``radii``."""
        leaves = {n: g.detach().clone().requires_grad_(True) for n, g in radii.items()}
        with torch.enable_grad():
            loss = self.loss(model, leaves, images, labels, precision)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        return float(loss.detach()), dict(zip(leaves, grads))


class HeldOutStream:
    """Batches of the suite's val split (eval transform), pass after pass, each pass shuffled by
    (seed, pass): batch ``k`` is the same batch on every rank and after a resume."""

    def __init__(self, ctx: MethodContext, batch_size: int):
        self.ctx, self.batch_size = ctx, batch_size
        size = Manifest.load(ctx.split_dir("val")).num_samples
        if size == 0:
            raise ValueError(f"suite {ctx.suite.name!r}: its val split is empty; TPGM trains its radii on it")
        self.per_pass = math.ceil(size / batch_size)
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._next = -1

    def _from(self, k: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        first, skip = divmod(k, self.per_pass)
        for n in itertools.count(first):
            batches = self.ctx.loader("val", batch_size=self.batch_size, shuffle_seed=step_seed(self.ctx.config.seed, n))
            yield from itertools.islice(batches, skip if n == first else 0, None)

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None or k != self._next:  # a resumed run starts mid-pass (skips once)
            self._batches = self._from(k)
        images, labels = next(self._batches)
        self._next = k + 1
        device = self.ctx.clip.device
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def train_radii(projection: Projection, model: torch.nn.Module, radii: dict[str, torch.Tensor],
                moments: dict[str, dict[str, Any]], batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                iterations: int, lr: float, first_step: int, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """``iterations`` Adam steps of the radii on ``batches`` (each clamped before use); returns them clamped.

    ``moments[name]`` holds each radius's Adam moments; ``first_step`` is the Adam step count of the
    first update (torch.optim.Adam counts per parameter, every radius gets a gradient each time).
    """
    for i in range(iterations):
        radii = projection.clamp(radii)
        images, labels = next(batches)
        _, grads = projection.radius_grads(model, radii, images, labels, precision)
        radii = {n: scalar_adam(g, grads[n], moments[n], "radius", first_step + i, lr) for n, g in radii.items()}
    return projection.clamp(radii)


# --------------------------------------------------------------------------- post-hoc mode


def project_post_hoc(ctx: MethodContext, finetuned: Classifier, opts: TPGMOptions) -> Classifier:
    """Train the radii between ``ctx.zeroshot`` and ``finetuned`` on val batches; the projected classifier."""
    model = copy.deepcopy(finetuned).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    projection = Projection.between(anchor_tensors(ctx.zeroshot, opts.project_head), dict(model.named_parameters()),
                                    opts.norm)
    radii = projection.initial_radii()
    zero = lambda g: torch.zeros_like(g)
    moments = {n: {"radius_m": zero(g), "radius_v": zero(g)} for n, g in radii.items()}
    stream = HeldOutStream(ctx, opts.val_batch_size)
    batches = (stream.batch(k) for k in itertools.count())
    radii = train_radii(projection, model, radii, moments, batches, opts.steps, opts.radius_lr, 1, ctx.config.precision)
    alphas = {}
    with torch.no_grad():
        params = projection.params(radii)
        for name, p in model.named_parameters():
            if name in params:
                p.copy_(params[name])
                alphas[name] = float(ratio(radii[name], projection.norms[name]).mean())
    model.info.provenance.update({"method": "tpgm", "tpgm": {
        "mode": "post-hoc", "iterations": opts.steps, "norm_mode": opts.norm, "projected_tensors": len(alphas),
        "alpha_mean": sum(alphas.values()) / max(1, len(alphas)), "alphas": alphas}})
    return model


# --------------------------------------------------------------------------- per-step mode


class TPGMAdam(AnchoredAdam):
    """AdamW (``AnchoredAdam``'s step on every tensor), then TPGM's projection of the anchored ones.

    The radii (``state[p]["radius"]`` and moments) and the counters ``group["t"]`` (optimizer steps) and
    ``group["radius_steps"]`` (radius updates = val batches used) are optimizer state; ``model`` and
    ``stream`` are not (they are rebuilt by the run).
    """

    def __init__(self, named: NamedParameters, anchors: dict[str, torch.Tensor], *, model: torch.nn.Module,
                 stream: HeldOutStream, precision: str, **hyper: Any):
        super().__init__(named, anchors, radius_steps=0, **hyper)
        self.model, self.stream, self.precision = model, stream, precision

    @torch.no_grad()
    def step(self, closure=None) -> None:
        super().step(closure)
        group = self.param_groups[0]
        named = [(self.names[id(p)], p) for p in group["params"] if id(p) in self.anchors and p.grad is not None]
        by_name = dict(named)
        projection = Projection.between({n: self.anchors[id(p)] for n, p in named}, by_name, group["norm_mode"])
        for name in projection.deltas:
            state = self.state[by_name[name]]
            if "radius" not in state:  # the tensor's first projection: γ = min(n)/2
                start = projection.norms[name].min() / 2
                state.update(radius=start, radius_m=torch.zeros_like(start), radius_v=torch.zeros_like(start))
        radii = {n: self.state[by_name[n]]["radius"] for n in projection.deltas}
        if (group["t"] - 1) % group["every"] == 0 and group["iterations"]:
            first = group["radius_steps"]
            batches = (self.stream.batch(k) for k in itertools.count(first))
            training = self.model.training
            self.model.eval()  # the code evaluates the projected copy in eval mode
            radii = train_radii(projection, self.model, radii, {n: self.state[by_name[n]] for n in radii}, batches,
                                group["iterations"], group["radius_lr"], first + 1, self.precision)
            self.model.train(training)
            group["radius_steps"] = first + group["iterations"]
        radii = projection.clamp(radii)
        for name, value in projection.params(radii).items():
            by_name[name].copy_(value)
            self.state[by_name[name]]["radius"] = radii[name]


def project_per_step(ctx: MethodContext, opts: TPGMOptions) -> Classifier:
    """Fine-tune a copy of the zero-shot classifier with the base's recipe, projecting after every step."""
    recipe: FinetuneOptions = ctx.sub_context(opts.base, opts.base_options).options
    model = copy.deepcopy(ctx.zeroshot).to(ctx.clip.device)
    for p in model.parameters():
        p.requires_grad_(True)
    stream = HeldOutStream(ctx, opts.val_batch_size)
    anchors = anchor_tensors(ctx.zeroshot, opts.project_head)
    hyper = dict(radius_lr=opts.radius_lr, iterations=opts.steps, every=opts.every, norm_mode=opts.norm)

    def build(named: NamedParameters, cfg: OptimConfig) -> torch.optim.Optimizer:
        return TPGMAdam(named, anchors, lr=cfg.lr, weight_decay=cfg.weight_decay, model=model, stream=stream,
                        precision=ctx.config.precision, **hyper)

    factory = OptimizerFactory("tpgm-per-step", build, tuple(sorted({**hyper, "project_head": opts.project_head,
                                                                      "val_batch_size": opts.val_batch_size}.items())))
    summary = run_training(ctx, model, recipe, mean_loss(cross_entropy(recipe.label_smoothing)), "tpgm fine-tuning",
                           factory)
    model.info.provenance.update({"method": "tpgm", "training": summary, "tpgm": {
        "mode": "per-step", "iterations": opts.steps, "every": opts.every, "norm_mode": opts.norm}})
    return model


@register_method("tpgm", paper="Tian, Dai, Ma, He, Liu & Kira, Trainable Projected Gradient Method for Robust "
                 "Fine-Tuning, CVPR 2023")
class TPGM:
    """Per-tensor projection radii towards the pre-trained weights, learned on the val split (post-hoc or per step)."""

    options = TPGMOptions

    @staticmethod
    def needs_val(options: TPGMOptions) -> bool:
        return True  # the radii are trained on the val split (checked by resolve(), before anything is written)

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: TPGMOptions = ctx.options
        torch.manual_seed(ctx.config.seed)
        if opts.mode == "per-step":
            model = ctx.cached_classifier(lambda: project_per_step(ctx, opts))
            return [Candidate("tpgm per-step", model, alpha=1.0, endpoint="finetuned", base="tpgm")]
        base_name = f"file:{Path(opts.finetuned).name}" if opts.finetuned else opts.base
        model = ctx.cached_classifier(lambda: project_post_hoc(ctx, finetuned_endpoint(ctx, opts)[0], opts))
        return [Candidate(f"tpgm/{base_name}", model, alpha=1.0, endpoint="finetuned", base=base_name,
                          extra={"tpgm_mode": "post-hoc"})]
