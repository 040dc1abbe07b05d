"""Reading text that comes from strangers (submission bundles): JSON parsed strictly, and the characters
plain text may not hold."""
from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

from robustbench_ft.util import DuplicateKeyError, unique_keys


class UntrustedJSONError(ValueError):
    """The text is not JSON a bundle may be: malformed, non-finite numbers, absurd sizes, repeated keys."""


# Unicode categories never allowed in bundle text: controls (C0 and C1; tab and newline excepted),
# format characters (bidi overrides and isolates, zero-width spaces and joiners, BOM), surrogates,
# private use, unassigned code points, line and paragraph separators.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def unsafe_character(text: str) -> str | None:
    """The first character of ``text`` a bundle may not contain (markup brackets or an unsafe
    Unicode category), as U+XXXX, or None."""
    for ch in text:
        if ch in "<>" or (ch not in "\t\n" and unicodedata.category(ch) in UNSAFE_CATEGORIES):
            return f"U+{ord(ch):04X}"
    return None


def _refuse_constant(name: str) -> float:
    raise UntrustedJSONError(f"the text contains {name}; every number must be finite")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UntrustedJSONError(f"the text contains the number {text[:40]!r}, too large to be finite")
    return value


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 15:
        raise UntrustedJSONError(f"the text contains the integer {text[:40]}…, far too large for any count")
    return int(text)


def parse_untrusted_json(text: str) -> Any:
    """``json.loads`` that refuses NaN and ±Infinity, numbers too large to be finite or to be any count,
    a key twice in one object, and nesting deep enough to exhaust the parser."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_parse_float, parse_int=_parse_int,
                          object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise UntrustedJSONError(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise UntrustedJSONError("nested too deeply to be a submission bundle") from None
    except DuplicateKeyError as exc:
        raise UntrustedJSONError(str(exc)) from None
