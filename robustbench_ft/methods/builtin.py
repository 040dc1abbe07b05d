"""Importing this module registers the built-in methods."""
from robustbench_ft.methods import (  # noqa: F401
    ensemble, finetune, flyp, l2_sp, linear_probe, lp_ft, soup, wise_ft, zeroshot,
)
