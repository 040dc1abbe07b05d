"""White-box AutoAttack against a candidate, in un-normalised [0, 1] pixel space.

Package: ``pyautoattack`` 0.2.0 (PyPI; authors Croce & Hein, homepage github.com/fra31/auto-attack), a packaging
of fra31/auto-attack whose attack code (``autopgd_base.py``, ``fab_pt.py``, ``fab_base.py``, ``square.py``,
``fab_projections.py``, ``other_utils.py``, ``state.py``) is the same as fra31/auto-attack @ a392200 up to import
lines (diffed for this module); only the ``AutoAttack`` wrapper differs (keyword arguments, ``logging`` instead of
prints, no TensorFlow). Chosen over ``torchattacks`` 3.5.1 because torchattacks has no ℓ1 APGD/Square (its APGD,
APGDT and Square assert ℓ∞/ℓ2) and its AutoAttack runs 10 APGD/FAB iterations instead of the original's 100;
fra31's own package is not on PyPI (``pip install git+https://github.com/fra31/auto-attack`` is its install route,
which Heuillet et al. use unpinned). Notes: /work/research/datasets_perturbations.md §7.

``version='standard'`` as in fra31's ``set_version``: APGD-CE, APGD-T (DLR), FAB-T, Square (5,000 queries); ℓ1 uses
APGD with large-ε restarts (5 restarts, 5 target classes). Departures, all forced by the class count and recorded:
the number of target classes is capped at C − 1 (fra31 assumes ≥ 10 classes and only warns), and APGD-T is left out
below 4 classes (its targeted DLR loss reads the 4th-largest logit).
"""
from __future__ import annotations

import contextlib
from importlib.metadata import PackageNotFoundError, version
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from robustbench_ft.models.combined import ProbabilityMixture

PACKAGE = "pyautoattack"


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


class PixelSpaceModel(torch.nn.Module):
    """A candidate seen from [0, 1] pixels: normalisation first (so attacks perturb pixels, not normalised
    values), then the candidate's scores over the reference classes (a probability mixture gives the log of
    its mixture, as it is scored)."""

    def __init__(self, model: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        device = next(model.parameters()).device
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, device=device).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - self.mean) / self.std
        if isinstance(self.model, ProbabilityMixture):
            logits, feats = self.model.members.outputs(x)
            weights = self.model.weights(feats).to(logits[0].dtype)
            mix = sum(weights[:, i:i + 1] * F.softmax(z / self.model.temperatures[i], dim=-1)
                      for i, z in enumerate(logits))
            return torch.log(mix.clamp_min(torch.finfo(mix.dtype).tiny))
        if getattr(self.model, "output_width", None) is not None:
            raise ValueError(f"cannot attack a {type(self.model).__name__}: its raw outputs are not class scores; "
                             "perturbation shifts support Classifier-like candidates and probability mixtures")
        return self.model(x)


@contextlib.contextmanager
def frozen_eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the attack (input gradients only); both restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def attack_plan(norm: str, num_classes: int) -> dict:
    """Which standard-version attacks run and with how many target classes (see the module docstring)."""
    attacks = ["apgd-ce", "apgd-t", "fab-t", "square"]
    if num_classes < 4:
        attacks.remove("apgd-t")
    targets = 5 if norm == "L1" else 9
    return {"attacks": attacks, "target_classes": max(1, min(targets, num_classes - 1))}


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    d = (x_adv - x).flatten(1)
    return {"Linf": d.abs().amax(1), "L2": d.norm(dim=1), "L1": d.abs().sum(1)}[norm]


def autoattack(model: PixelSpaceModel, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, seed: int,
               num_classes: int, batch_size: int) -> torch.Tensor:
    """Adversarial inputs for ``(x, y)`` (pixels in [0, 1]) under AutoAttack standard, ``seed`` fixed.

    The global torch RNG is left as it was (AutoAttack seeds it per attack). Raises if an output leaves the
    ε-ball or [0, 1], which the package guarantees: a check that it did."""
    from pyautoattack import AutoAttack

    plan = attack_plan(norm, num_classes)
    devices = [x.device] if x.device.type == "cuda" else []
    with frozen_eval(model), torch.random.fork_rng(devices=devices):
        adversary = AutoAttack(model, norm=norm, eps=eps, version="standard", seed=seed, device=x.device)
        adversary.attacks_to_run = plan["attacks"]
        adversary.apgd_targeted.n_target_classes = plan["target_classes"]
        adversary.fab.n_target_classes = plan["target_classes"]
        x_adv, _ = adversary.run_standard_evaluation(x.float(), y, batch_size=batch_size)
    x_adv = x_adv.to(x.device)
    dist = perturbation_norms(x_adv, x, norm)
    if bool((dist > eps * (1 + 1e-4) + 1e-6).any()) or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError(f"AutoAttack returned inputs outside the {norm} ball of {eps:g} or [0, 1] "
                           f"(max distance {float(dist.max()):.6g}); refusing to score them")
    return x_adv


def attack_facts(norm: str, eps: float, num_classes: int) -> dict:
    """What a record says about an attack shift: attack, version, norm, ε, package and version, attacks run."""
    plan = attack_plan(norm, num_classes)
    return {"attack": "autoattack", "version": "standard", "norm": norm, "eps": float(np.float64(eps)),
            "package": PACKAGE, "package_version": package_version(PACKAGE), "attacks": ",".join(plan["attacks"]),
            "target_classes": plan["target_classes"]}
