"""Datasets and suites: one declaration each (``DatasetSpec``, ``Suite``), registered by name.

Importing this package registers the built-in families: the embedded demo suite, ImageNet and its
five shifts, the WILDS suites and the transfer datasets. Third-party packages register theirs
through the entry-point groups ``robustbench_ft.datasets`` and ``robustbench_ft.suites``.
"""
from robustbench_ft.datasets import (  # noqa: F401  (register the built-in families)
    binary_sets,
    cifar_shifts,
    demo,
    domainnet,
    imagenet,
    robust_transfer,
    transfer,
    video_robust,
    wilds,
)
from robustbench_ft.datasets.build import ensure_dataset, prepare_suite
from robustbench_ft.datasets.registry import (
    get_dataset,
    get_suite,
    list_datasets,
    list_suites,
    register_dataset,
    register_suite,
)
from robustbench_ft.datasets.spec import DatasetSpec, Suite

__all__ = ["DatasetSpec", "Suite", "register_dataset", "register_suite", "get_dataset", "get_suite", "list_datasets",
           "list_suites", "ensure_dataset", "prepare_suite"]
