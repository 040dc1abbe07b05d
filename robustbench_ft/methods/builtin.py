"""Importing this module registers the built-in methods."""
from robustbench_ft.methods import finetune, wise_ft, zeroshot  # noqa: F401
