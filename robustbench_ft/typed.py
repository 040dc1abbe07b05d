"""Typed values for dataclass fields, from every config source: TOML files, Python and command-line text.

A run is configured by dataclasses (``RunConfig``, each method's options). Their type hints are the
one declaration of what a key accepts, and this module holds every value to them before it reaches a
field, so a config file cannot switch on ``trust_pickle`` with the string ``"false"``:

* :func:`check` is for structured sources (TOML, Python): a value must already have its field's
  type. Booleans only from booleans, whole numbers only from integers, numbers only from numbers
  (an integer widens to a float; NaN and infinity are refused), strings only from strings, a
  table only where the field is a ``dict``, a list only where it is a ``tuple``.
* :func:`from_text` is for command-line flags: the text is parsed as the field's type (``true``,
  ``false``, ``1e-4``, ``0,1,2``, ``none`` for an optional field) and the result checked as above.

``Annotated[T, parser]`` fields (the WiSE-FT α grammar ``0:1:0.1``) run their parser on a string,
number or list and the result is checked as ``T``; ``Literal[...]`` fields accept only their values.
Every refusal is one :class:`ConfigError` line naming the key, the type it needs and the value given.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class ConfigError(ValueError):
    """A config value that does not fit its key's declared type."""

    def __init__(self, message: str, why: str = ""):
        super().__init__(message)
        self.why = why  # the detail behind a refusal ("it must be finite"), kept when an outer type re-words it


def describe(hint: Any) -> str:
    """The type of a field in words, for error messages ("a whole number", "true or false")."""
    hint = _strip_annotated(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "a whole number"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if _is_optional(hint):
        return f"{describe(_optional_inner(hint))} (or none)"
    if origin is tuple:
        return f"a list of {_plural(args[0])}"
    if origin is dict or hint is dict:
        value = _dict_value(hint)
        return "a table" if value is Any else f"a table of {_plural(value)}"
    return getattr(hint, "__name__", str(hint))


def _dict_value(hint: Any) -> Any:
    """The value type of a ``dict[str, T]`` hint (Any for a bare ``dict`` or ``dict[str, Any]``)."""
    args = typing.get_args(hint)
    return args[1] if len(args) == 2 else Any


def _plural(hint: Any) -> str:
    return {bool: "booleans", int: "whole numbers", float: "numbers", str: "strings"}.get(hint, describe(hint))


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value[:60]!r}" + ("…" if len(value) > 60 else "")
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if value is None:
        return "none"
    return f"{type(value).__name__} {str(value)[:60]}"


def _strip_annotated(hint: Any) -> Any:
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def _is_optional(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _optional_inner(hint: Any) -> Any:
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(inner) != 1:
        raise TypeError(f"unsupported field type {hint}: only Optional[T] unions are")
    return inner[0]


def _error(key: str, hint: Any, value: Any, why: str = "") -> ConfigError:
    return ConfigError(f"config key {key!r} must be {describe(hint)}, got {_shown(value)}" + (f" ({why})" if why else ""),
                       why)


def check(value: Any, hint: Any, key: str) -> Any:
    """``value`` as field type ``hint`` demands it (see the module docstring); ConfigError otherwise."""
    if typing.get_origin(hint) is typing.Annotated:
        inner, parser = typing.get_args(hint)[0], hint.__metadata__[0]
        if isinstance(value, (str, int, float, list, tuple)) and not isinstance(value, bool):
            try:
                value = parser(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"config key {key!r}: {exc}") from None
        return check(value, inner, key)
    if hint is Any:
        return value
    if _is_optional(hint):
        if value is None:
            return None
        try:
            return check(value, _optional_inner(hint), key)
        except ConfigError as exc:  # say "(or none)": the whole type, not just its inner one
            raise _error(key, hint, value, exc.why) if exc.args[0].startswith(f"config key {key!r} must") else exc
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise _error(key, hint, value, "too large") from None
            if not math.isfinite(number):
                raise _error(key, hint, value, "it must be finite")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is typing.Literal:
        if isinstance(value, str) and value in typing.get_args(hint):
            return value
    elif origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)):
            return tuple(check(v, item, f"{key}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, dict):  # one value stands for a list of one
            try:
                return (check(value, item, key),)
            except ConfigError as exc:
                raise _error(key, hint, value, exc.why) from None
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise _error(key, hint, value, "its keys must be strings")
            item = _dict_value(hint)
            return {k: check(v, item, f"{key}.{k}") for k, v in value.items()}
    else:
        raise TypeError(f"config key {key!r}: unsupported field type {hint}")
    raise _error(key, hint, value)


def from_text(text: str, hint: Any, key: str) -> Any:
    """A command-line value: ``text`` parsed as field type ``hint``, then :func:`check`\\ ed."""
    if not isinstance(text, str):
        return check(text, hint, key)
    if typing.get_origin(hint) is typing.Annotated:
        return check(text, hint, key)  # its parser reads text
    if _is_optional(hint):
        return None if text.strip().lower() in ("", "none") else from_text(text, _optional_inner(hint), key)
    origin = typing.get_origin(hint)
    word = text.strip()
    try:
        if hint is bool:
            if word.lower() in _TRUE:
                return True
            if word.lower() in _FALSE:
                return False
            raise ValueError
        if hint is int:
            return int(word)
        if hint is float:
            return check(float(word), float, key)
        if origin is tuple:
            item = typing.get_args(hint)[0]
            return tuple(from_text(part, item, f"{key}[{i}]") for i, part in enumerate(p for p in word.split(",")
                                                                                       if p.strip()))
    except ConfigError:
        raise
    except ValueError:
        raise _error(key, hint, text) from None
    if origin is dict or hint is dict:
        item = _dict_value(hint)
        if item is Any:
            raise ConfigError(f"config key {key!r} is a table: set it in a config file, not on the command line")
        return _table_from_text(text, item, key)
    return check(text, hint, key)


def _table_from_text(text: str, item: Any, key: str) -> dict[str, Any]:
    """``name=value,name=value`` (a ``dict[str, T]`` on the command line); each value parsed as ``T``."""
    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"config key {key!r} must be name=value pairs separated by commas, got {_shown(text)}")
        out[name.strip()] = from_text(value.strip(), item, f"{key}.{name.strip()}")
    return out


def field_hints(cls: type) -> dict[str, Any]:
    """Field name -> type hint of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check (and normalise, e.g. int -> float, list -> tuple) every field of a dataclass instance in
    place; for ``__post_init__`` of frozen config dataclasses."""
    for name, hint in field_hints(type(obj)).items():
        object.__setattr__(obj, name, check(getattr(obj, name), hint, prefix + name))


def build(cls: type, values: Mapping[str, Any], where: str, *, text: bool = False) -> Any:
    """An instance of dataclass ``cls`` from ``values``: unknown keys refused (listing the valid ones),
    each value checked (``text=True``: parsed from command-line text first)."""
    hints = field_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"{where} has no option(s) {unknown}; its options: {sorted(hints) or 'none'}")
    convert = from_text if text else check
    return cls(**{k: convert(v, hints[k], k) for k, v in values.items()})
