"""Perturbation shifts: AutoAttack ℓ∞/ℓ2/ℓ1 and the common-corruption portfolio on the reference test set."""
from robustbench_ft.perturbations.spec import PAPER_SET, Perturbation, parse_perturbation, parse_perturbations

__all__ = ["PAPER_SET", "Perturbation", "parse_perturbation", "parse_perturbations"]
