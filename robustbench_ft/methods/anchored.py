"""What the projection family's optimizers share (FTP, SPD, DiGraP, and TPGM's per-step mode).

Each of them is Adam plus a rule that keeps a tensor near its pre-trained value θ₀ (its *anchor*):

* :class:`AnchoredAdam` is the bias-corrected Adam step of the authors' code (FTP ``util/FTP.py``
  ``AdamP.adam``, SPD ``adamSPD.py``, DiGraP ``optimizer/spcg.py``: ``denom = √v/√(1−β₂ᵗ) + eps``,
  ``step = lr/(1−β₁ᵗ)·m/denom``, the same formula as ``torch.optim.Adam``'s single-tensor path) with
  AdamW's decoupled weight decay folded in as FTP does (``d = step + lr·wd·θ_{t−1}``; 0 by default,
  as in all three codes). Subclasses decide what happens to each anchored tensor.
* The anchors are *not* optimizer state: they are the start classifier's own tensors (the zero-shot
  classifier, rebuilt by every run), referenced, never copied or saved. The authors' code keeps
  them in ``param_groups[...]["pre"]``, which ``state_dict()`` would write into every resumable
  state (one more model per checkpoint). Everything else (moments, radii, previous displacements,
  the global step counter) lives in ``optimizer.state`` and the param group, which is what a
  resumable training state saves (see :class:`~robustbench_ft.methods.training.OptimizerFactory`).
* Which tensors are anchored: every trainable one, except the linear head when ``project_head`` is
  off. The head here is the zero-shot text head (``logit_scale·W_zs``), a meaningful anchor, so the
  methods that the authors ran with a *random* head (FTP, TPGM on DomainNet) exclude it only where
  their code's convention is followed (see each method).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from robustbench_ft.methods.finetune import FinetuneOptions
from robustbench_ft.methods.training import NamedParameters, OptimConfig, OptimizerFactory
from robustbench_ft.models.classifier import Classifier

HEAD_PREFIX = "head."


@dataclass(frozen=True)
class AnchoredOptions(FinetuneOptions):
    """``finetune``'s recipe with AdamW's decay off (none of the authors' optimizers decays by default)."""

    weight_decay: float = 0.0
    project_head: bool = True   # anchor the zero-shot head too (the methods override this default where needed)


def check_range(method: str, name: str, value: float, low: float, high: float = math.inf) -> None:
    """One error line for an option outside [low, high]."""
    if not (low <= value <= high):
        bound = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{method}: {name} must be {bound}, got {value:g}")


def anchor_tensors(start: Classifier, project_head: bool) -> dict[str, torch.Tensor]:
    """The anchors θ₀ by parameter name: ``start``'s tensors themselves (read only), head left out unless
    ``project_head``."""
    return {name: p.detach() for name, p in start.named_parameters()
            if project_head or not name.startswith(HEAD_PREFIX)}


def scalar_adam(value: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], prefix: str, t: int, lr: float,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    """One Adam step of a learned scalar (FTP's radius, DiGraP's strength, TPGM's radii), bias-corrected
    with step ``t``; its moments are ``state[prefix + "_m"]`` and ``[prefix + "_v"]`` (start at 0)."""
    m = state[prefix + "_m"] = torch.lerp(state[prefix + "_m"], grad, 1 - betas[0])
    v = state[prefix + "_v"] = torch.addcmul(state[prefix + "_v"] * betas[1], grad, grad, value=1 - betas[1])
    denom = v.sqrt() / math.sqrt(1 - betas[1] ** t) + eps  # √v̂ + eps, as torch.optim.Adam computes it
    return value - m / denom * (lr / (1 - betas[0] ** t))


class AnchoredAdam(torch.optim.Optimizer):
    """Adam over named parameters, some of them with an anchor; subclasses override :meth:`update_anchored`.

    ``group["t"]`` counts optimizer steps (one global counter, as FTP and DiGraP keep); it is in the
    param group, hence in ``state_dict()``. Subclasses see all anchored tensors of a step at once, so
    the per-tensor scalars (radii, strengths, ratios) are computed as one vector: a handful of small
    operations per step instead of a dozen per tensor (each a kernel launch on a GPU).
    """

    def __init__(self, named: NamedParameters, anchors: Mapping[str, torch.Tensor], *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 **hyper: Any):
        super().__init__([p for _, p in named], dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                                     t=0, **hyper))
        self.names = {id(p): n for n, p in named}
        self.anchors: dict[int, torch.Tensor] = {}
        for name, p in named:
            if name in anchors:
                anchor = anchors[name]
                if anchor.shape != p.shape:
                    raise ValueError(f"anchor of {name!r} has shape {tuple(anchor.shape)}, the parameter "
                                     f"{tuple(p.shape)}")
                self.anchors[id(p)] = anchor.to(p.device, p.dtype)  # no copy when already there

    def adam_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """d_t, the step Adam would subtract from ``p`` (moments updated), weight decay folded in."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)  # torch.optim.Adam's own order of operations
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = exp_avg_sq.sqrt().div_(math.sqrt(bias2)).add_(group["eps"])
        d = torch.div(exp_avg, denom).mul_(group["lr"] / bias1)
        if group["weight_decay"]:
            d.add_(p, alpha=group["lr"] * group["weight_decay"])
        return d

    def update_anchored(self, items: list[tuple[torch.Tensor, torch.Tensor]], group: dict) -> None:
        """Update the anchored tensors with a gradient, ``items`` = [(parameter, anchor)], in place
        (plain Adam here)."""
        for p, _ in items:
            p.sub_(self.adam_step(p, p.grad, group))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            raise ValueError(f"{type(self).__name__} takes no closure")
        for group in self.param_groups:
            group["t"] += 1
            anchored = []
            for p in group["params"]:
                if p.grad is None:  # as in the authors' code: a tensor without a gradient is left alone
                    continue
                anchor = self.anchors.get(id(p))
                if anchor is None:
                    p.sub_(self.adam_step(p, p.grad, group))
                else:
                    anchored.append((p, anchor))
            if anchored:
                self.update_anchored(anchored, group)


def gather(states: list[dict[str, Any]], key: str) -> torch.Tensor:
    """The scalars ``state[key]`` of several tensors as one vector."""
    return torch.stack([s[key] for s in states])


def scatter(states: list[dict[str, Any]], values: dict[str, torch.Tensor]) -> None:
    """Give each state its element of each vector: views, no copies (state scalars are only ever replaced,
    never changed in place, so sharing the vector's storage is safe; ``torch.save`` stores it once)."""
    for key, vector in values.items():
        for s, value in zip(states, vector.unbind()):
            s[key] = value


def anchored_factory(name: str, cls: type[AnchoredAdam], start: Classifier, project_head: bool,
                     **hyper: Any) -> OptimizerFactory:
    """The :class:`OptimizerFactory` of ``cls`` anchored at ``start`` (``hyper``: the method's own options,
    which also enter the resumable state's fingerprint)."""
    anchors = anchor_tensors(start, project_head)

    def build(named: NamedParameters, cfg: OptimConfig) -> torch.optim.Optimizer:
        return cls(named, anchors, lr=cfg.lr, weight_decay=cfg.weight_decay, **hyper)

    return OptimizerFactory(name, build, tuple(sorted({**hyper, "project_head": project_head}.items())))


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over every dim but the first, kept as size-1 dims (the "MARS" rows of FTP and TPGM); a 1-D or
    0-D tensor is one row: its total, shape [1] (what ``torch.sum(x, dim=())`` gives in their code)."""
    if x.dim() <= 1:
        return x.sum().reshape(1)
    return x.sum(dim=tuple(range(1, x.dim())), keepdim=True)
