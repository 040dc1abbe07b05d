"""Perturbation shifts by name: ``linf-4/255``, ``l2-2.0``, ``l1-75`` (AutoAttack "standard") and
``corruptions-s3`` (the 11-corruption portfolio at severity 3).

The four names and their budgets are Heuillet et al.'s (arXiv 2508.14079; MaxHeuillet/robust_training @ 4c886c1
``distributed_experiment_final.py::test_loop``: ℓ∞ ε = ``config.epsilon`` = 0.015686275 = 4/255, ℓ2 ε = 2.0, ℓ1 ε = 75.0,
AutoAttack ``version='standard'``; ``corruptions/common.py::apply_portfolio_of_corruptions(severity=3)``). Any other
budget can be named the same way (``linf-8/255``, ``l2-0.5``, ``corruptions-s5``), e.g. scaled to small images.
Budgets are in un-normalised [0, 1] pixel units of the model's input resolution.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from robustbench_ft.typed import ConfigError

NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
PAPER_SET = ("linf-4/255", "l2-2.0", "l1-75", "corruptions-s3")
_ATTACK = re.compile(r"(linf|l2|l1)-([0-9]+(?:\.[0-9]+)?(?:/[0-9]+)?)")
_CORRUPTIONS = re.compile(r"corruptions-s([1-5])")


@dataclass(frozen=True)
class Perturbation:
    """One perturbation shift: an AutoAttack threat model (``norm``, ``eps``) or a corruption severity."""

    name: str
    kind: str                    # "autoattack" or "corruptions"
    norm: str | None = None      # "Linf" | "L2" | "L1" (AutoAttack's spelling)
    eps: float | None = None
    severity: int | None = None


def parse_perturbation(name: str) -> Perturbation:
    """The perturbation a name stands for; a clear error naming the accepted forms otherwise."""
    attack = _ATTACK.fullmatch(name)
    if attack:
        text = attack.group(2)
        eps = float(Fraction(text)) if "/" in text else float(text)
        if not (math.isfinite(eps) and eps > 0):
            raise ConfigError(f"perturbation {name!r}: the budget must be a positive number")
        if NORMS[attack.group(1)] == "Linf" and eps >= 1:
            raise ConfigError(f"perturbation {name!r}: an l-inf budget of {eps:g} covers the whole [0, 1] pixel "
                              "range; budgets are in [0, 1] pixel units (4/255, not 4)")
        return Perturbation(name, "autoattack", norm=NORMS[attack.group(1)], eps=eps)
    corruption = _CORRUPTIONS.fullmatch(name)
    if corruption:
        return Perturbation(name, "corruptions", severity=int(corruption.group(1)))
    raise ConfigError(f"unknown perturbation {name!r}; use linf-<eps>, l2-<eps>, l1-<eps> (eps a number or a "
                      f"fraction such as 4/255) or corruptions-s<1-5>; the paper's set is {', '.join(PAPER_SET)}")


def parse_perturbations(names: tuple[str, ...] | list[str]) -> list[Perturbation]:
    """Every name parsed, in order; a repeated one is refused (it would be attacked twice)."""
    if len(set(names)) != len(names):
        raise ConfigError(f"perturbations are listed more than once: {list(names)}")
    return [parse_perturbation(n) for n in names]
