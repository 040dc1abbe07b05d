"""Method registry: ``@register_method(name)`` plus the ``robustbench_ft.methods`` entry-point group.

A method is a class with an ``options`` dataclass (its fields become CLI flags and config keys)
and ``run(ctx) -> list[Candidate]``. Third-party packages register by exposing a module under the
entry-point group; importing it runs its ``@register_method`` decorators.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Protocol

from robustbench_ft.typed import build
from robustbench_ft.util import unknown_name_error

ENTRY_POINT_GROUP = "robustbench_ft.methods"
# Short names the papers use (``wise-ft --base ft|lp``), accepted wherever a method is named.
METHOD_ALIASES = {"ft": "finetune", "lp": "linear-probe"}


class Method(Protocol):
    options: type

    def run(self, ctx: Any) -> list[Any]: ...


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type
    options: type
    summary: str
    paper: str
    defaults: str = ""  # where the option defaults come from (shown by `robustbench-ft list methods`)

    def make_options(self, values: dict[str, Any]) -> Any:
        """Build the options dataclass from config values, each checked against its declared type
        (:func:`robustbench_ft.typed.check`: command-line text is parsed before it gets here)."""
        return build(self.options, values, f"method {self.name!r}")


_METHODS: dict[str, MethodSpec] = {}
_PLUGINS_LOADED = False


def register_method(name: str, *, summary: str = "", paper: str = "", defaults: str = "") -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if not dataclasses.is_dataclass(getattr(cls, "options", None)):
            raise TypeError(f"method {name!r}: `options` must be a dataclass (use an empty one if there are none)")
        if name in _METHODS and _METHODS[name].cls is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].cls.__module__}")
        doc = (cls.__doc__ or "").strip().splitlines()
        _METHODS[name] = MethodSpec(name, cls, cls.options, summary or (doc[0] if doc else ""), paper, defaults)
        return cls

    return decorator


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name`` (or one of the :data:`METHOD_ALIASES`)."""
    _load_plugins()
    name = METHOD_ALIASES.get(name, name)
    if name not in _METHODS:
        raise unknown_name_error("method", name, list(_METHODS))
    return _METHODS[name]


def list_methods() -> list[MethodSpec]:
    _load_plugins()
    return [_METHODS[n] for n in sorted(_METHODS)]
