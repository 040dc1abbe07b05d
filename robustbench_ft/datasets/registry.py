"""The dataset and suite registries: ``register_dataset``/``register_suite`` and the entry-point groups
``robustbench_ft.datasets`` and ``robustbench_ft.suites`` for third-party packages.

The built-in families register themselves when :mod:`robustbench_ft.datasets` is imported (its
``__init__`` imports them), so this module imports none of them.
"""
from __future__ import annotations

from importlib.metadata import entry_points

from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.util import unknown_name_error

_DATASETS: dict[str, DatasetSpec] = {}
_SUITES: dict[str, Suite] = {}
_PLUGINS_LOADED = False


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in _DATASETS and _DATASETS[spec.name] is not spec:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _DATASETS[spec.name] = spec
    return spec


def register_suite(suite: Suite) -> Suite:
    if suite.name in _SUITES and _SUITES[suite.name] is not suite:
        raise ValueError(f"suite {suite.name!r} is already registered")
    _SUITES[suite.name] = suite
    return suite


def _load_plugins() -> None:
    """Import the third-party dataset and suite modules registered under the entry-point groups (once)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for group in ("robustbench_ft.datasets", "robustbench_ft.suites"):
        for ep in entry_points(group=group):
            ep.load()


def get_dataset(name: str) -> DatasetSpec:
    _load_plugins()
    if name not in _DATASETS:
        raise unknown_name_error("dataset", name, list(_DATASETS))
    return _DATASETS[name]


def get_suite(name: str) -> Suite:
    _load_plugins()
    if name not in _SUITES:
        raise unknown_name_error("suite", name, list(_SUITES))
    return _SUITES[name]


def list_datasets() -> list[DatasetSpec]:
    _load_plugins()
    return [_DATASETS[n] for n in sorted(_DATASETS)]


def list_suites() -> list[Suite]:
    _load_plugins()
    return [_SUITES[n] for n in sorted(_SUITES)]
