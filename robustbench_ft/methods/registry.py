"""Method registry: ``@register_method(name)`` plus the ``robustbench_ft.methods`` entry-point group.

A method is a class with an ``options`` dataclass (its fields become CLI flags and config keys)
and ``run(ctx) -> list[Candidate]``. Third-party packages register by exposing a module under the
entry-point group; importing it runs its ``@register_method`` decorators.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Protocol

from robustbench_ft.data.registry import unknown_name_error

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

    def make_options(self, values: dict[str, Any]) -> Any:
        """Build the options dataclass from config/CLI values (strings are parsed by field type)."""
        valid = {f.name: f for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"method {self.name!r} has no option(s) {unknown}; its options: {sorted(valid) or 'none'}")
        hints = typing.get_type_hints(self.options)
        parsed = {k: parse_option(k, v, hints[k]) for k, v in values.items()}
        return self.options(**parsed)

    def canonical_options(self, values: dict[str, Any]) -> dict[str, Any]:
        """The given option values as the options dataclass reads them, for hashing a config: ``--epochs 2``
        on the CLI and ``{"epochs": 2}`` from Python are the same run. A ``base_options`` dict (WiSE-FT,
        soups) holds options of the method named by ``base`` and is made canonical by that method."""
        from robustbench_ft.config import content_identity

        options = self.make_options(values)
        out = {k: content_identity(getattr(options, k)) for k in values}
        if isinstance(out.get("base_options"), dict):
            out["base_options"] = get_method(options.base).canonical_options(out["base_options"])
        return out


def parse_option(name: str, value: Any, hint: Any) -> Any:
    """Coerce a CLI string or TOML value to the option's declared type, with a clear error."""
    parser = getattr(hint, "__metadata__", None)
    if parser:  # Annotated[T, parser]
        return parser[0](value) if isinstance(value, (str, int, float, list, tuple)) else value
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
            return None
        return parse_option(name, value, args[0])
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # TOML/Python 2 and CLI "2" read alike (and hash alike)
    if not isinstance(value, str):
        return value
    try:
        if hint is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint in (int, float, str):
            return hint(value)
    except ValueError:
        raise ValueError(f"option {name!r}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


_METHODS: dict[str, MethodSpec] = {}
_PLUGINS_LOADED = False


def register_method(name: str, *, summary: str = "", paper: str = "") -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if not dataclasses.is_dataclass(getattr(cls, "options", None)):
            raise TypeError(f"method {name!r}: `options` must be a dataclass (use an empty one if there are none)")
        if name in _METHODS and _METHODS[name].cls is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].cls.__module__}")
        doc = (cls.__doc__ or "").strip().splitlines()
        _METHODS[name] = MethodSpec(name, cls, cls.options, summary or (doc[0] if doc else ""), paper)
        return cls

    return decorator


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    import robustbench_ft.methods.builtin  # noqa: F401  (registers the built-in methods)

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
