"""What a result record's fields must hold before it becomes a :class:`~robustbench_ft.results.ResultRecord`:
types field by field, then values (fractions in [0, 1], whole counts consistent with their fractions, a
score-like primary metric, averages that agree with their parts, effective robustness in [−1, 1], a bounded
training curve). A record read from disk may come from anyone, so nothing unchecked reaches a board."""
from __future__ import annotations

import math
from decimal import Decimal
from typing import Any


class RecordError(ValueError):
    """A record file that is not a valid result record."""


_STR_FIELDS = ("record_id", "suite", "model", "pretrained", "method", "candidate", "reference", "kind", "citation",
               "config_hash", "created")
_DICT_FIELDS = ("tags", "effective_robustness", "config", "versions", "timings")


def _is_number(value: Any) -> bool:
    """A finite number that converts to float (JSON allows NaN, Infinity and 400-digit integers)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def check_types(data: dict[str, Any], source: str) -> None:
    """Field types, so that a hand-edited or hostile file fails here with its field named rather
    than later inside a report (a string where a number belongs, a list where a table belongs)."""
    def bad(name: str, expected: str) -> RecordError:
        return RecordError(f"{source}: field {name!r} must be {expected}, got {type(data[name]).__name__}")

    for name in _STR_FIELDS:
        if name in data and not isinstance(data[name], str):
            raise bad(name, "a string")
    for name in _DICT_FIELDS:
        if name in data and not isinstance(data[name], dict):
            raise bad(name, "an object")
    if not isinstance(data["shifts"], list) or not all(isinstance(s, str) for s in data["shifts"]):
        raise bad("shifts", "a list of dataset names")
    metrics = data["metrics"]
    if not isinstance(metrics, dict) or not all(isinstance(m, dict) for m in metrics.values()):
        raise bad("metrics", "an object of dataset -> {metric: number}")
    for ds, values in metrics.items():
        for key, value in values.items():
            if not _is_number(value):
                raise RecordError(f"{source}: metrics[{ds!r}][{key!r}] must be a number (finite), got {str(value)[:40]}")
    primary = data.get("primary_metric", {})
    if not isinstance(primary, dict) or not all(isinstance(v, str) for v in primary.values()):
        raise RecordError(f"{source}: field 'primary_metric' must be an object of dataset -> metric name")
    for ds, values in metrics.items():  # every score shown or ranked is ``score(ds)``: it must exist
        key = primary.get(ds, "top1")
        if key not in values:
            raise RecordError(f"{source}: metrics[{ds!r}] has no {key!r}, its primary metric"
                              + ("" if ds in primary else " (top-1 unless primary_metric names another)"))
    summary = data.get("summary", {})
    if not isinstance(summary, dict):
        raise bad("summary", "an object")
    for key, entry in summary.items():
        if (not isinstance(entry, dict) or not _is_number(entry.get("value")) or not isinstance(entry.get("metric"), str)
                or not isinstance(entry.get("over"), list) or not all(isinstance(d, str) for d in entry["over"])):
            raise RecordError(f"{source}: summary[{key!r}] must be an object with 'metric' (string), 'value' "
                              f"(number) and 'over' (list of dataset names)")
    identity = data.get("data", {})
    if not isinstance(identity, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in identity.items()):
        raise RecordError(f"{source}: field 'data' must be an object of \"dataset/split\" -> manifest hash (strings)")
    _check_training(data.get("training", {}), source)
    _check_perturbations(data.get("perturbations", {}), source)
    skipped = data.get("skipped_samples", {})
    if not isinstance(skipped, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("count"), int) and not isinstance(e["count"], bool)
            and e["count"] >= 0 and isinstance(e.get("events", []), list) for e in skipped.values()):
        raise RecordError(f"{source}: field 'skipped_samples' must be an object of dataset -> "
                          f"{{'count': whole number, 'events': [...]}}")


MAX_CURVE_POINTS = 10_000


def _check_training(training: Any, source: str) -> None:
    """``training``: an object of numbers, strings, booleans or nulls, and a ``curve`` of equal-length lists
    of numbers (grad_norm may hold nulls), so that a report can draw it whoever wrote the file."""
    where = f"{source}: field 'training'"
    if not isinstance(training, dict):
        raise RecordError(f"{where} must be an object")
    for key, value in training.items():
        if key == "curve":
            continue
        if not (value is None or isinstance(value, (str, bool)) or _is_number(value)):
            raise RecordError(f"{where}[{str(key)[:40]!r}] must be a number, string, boolean or null")
    curve = training.get("curve")
    if curve is None:
        return
    names = ("step", "loss", "lr", "grad_norm")
    if not isinstance(curve, dict) or set(curve) != set(names) or not all(isinstance(curve[k], list) for k in names) \
            or len({len(curve[k]) for k in names}) != 1 or len(curve["step"]) > MAX_CURVE_POINTS:
        raise RecordError(f"{where}['curve'] must be an object of {'/'.join(names)} lists of one length "
                          f"(at most {MAX_CURVE_POINTS})")
    for k in names:
        if not all(_is_number(v) or (k == "grad_norm" and v is None) for v in curve[k]):
            raise RecordError(f"{where}['curve'][{k!r}] must hold finite numbers")


def _check_perturbations(perturbations: Any, source: str) -> None:
    """``perturbations``: name -> {"top1", "clean_top1" fractions, "n" (a count >= 1 they are whole numbers of;
    a published entry may lack it), other facts numbers, strings, booleans or nulls}."""
    where = f"{source}: field 'perturbations'"
    if not isinstance(perturbations, dict):
        raise RecordError(f"{where} must be an object")
    for name, entry in perturbations.items():
        at = f"{where}[{str(name)[:40]!r}]"
        if not isinstance(entry, dict) or not all(_is_number(entry.get(k)) for k in ("top1", "clean_top1")):
            raise RecordError(f"{at} must be an object with numbers 'top1' and 'clean_top1' (and a count 'n')")
        for key, value in entry.items():
            if not (value is None or isinstance(value, (str, bool)) or _is_number(value)):
                raise RecordError(f"{at}[{str(key)[:40]!r}] must be a number, string, boolean or null")
        n = entry.get("n")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise RecordError(f"{at}['n'] must be a whole number >= 1, got {n!r}")
        for key in ("top1", "clean_top1"):
            if not 0.0 <= entry[key] <= 1.0 or (n is not None and not consistent_with_count(entry[key], n)):
                raise RecordError(f"{at}[{key!r}] = {entry[key]!r} must be a fraction in [0, 1]"
                                  + (f" and a whole number of the n = {n} samples" if n is not None else ""))


COUNT_PREFIXES = ("n@", "num_")  # with "n": metrics entries that are counts, not scores in [0, 1]


def is_count(key: str) -> bool:
    """Whether a metrics entry is a count (``n``, ``n@<shift>``, ``num_skipped``) rather than a score."""
    return key == "n" or key.startswith(COUNT_PREFIXES)


def decimals(value: float) -> int:
    """Decimal places of ``value`` as written (``0.762`` -> 3; a measured 7422/10000 -> 4; 1/3 -> 16)."""
    exponent = Decimal(repr(float(value))).normalize().as_tuple().exponent
    return max(0, -int(exponent)) if isinstance(exponent, int) else 0


def rounding(value: float) -> float:
    """Half a unit in the last decimal place of ``value`` as written: how far the true number may lie."""
    return 0.5 * 10.0 ** -decimals(value) + 1e-12


def consistent_with_count(fraction: float, n: int) -> bool:
    """Whether ``fraction`` can be k/n for a whole k, within the rounding of ``fraction`` as written
    (a reported 0.3333 with n = 1 cannot; 0.762 rounded from 38,100/50,000 can)."""
    k = round(fraction * n)
    return any(abs(j / n - fraction) <= rounding(fraction) for j in (k - 1, k, k + 1) if 0 <= j <= n)


def check_values(data: dict[str, Any], source: str) -> None:
    """Ranges and consistency, so that no loaded record can crash or hijack a board or a report:
    scores are fractions in [0, 1], counts whole numbers (``n`` >= 1), an accuracy and its count
    agree (top-1 · n whole within rounding), the primary metric is a score, a reported average
    agrees with the per-dataset numbers it averages, effective robustness lies in [-1, 1]."""
    metrics, primary = data["metrics"], data.get("primary_metric", {})
    for ds, values in metrics.items():
        for key, value in values.items():
            where = f"{source}: metrics[{ds[:40]!r}][{key[:40]!r}]"
            if is_count(key):
                if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "n" else 0):
                    raise RecordError(f"{where} must be a whole number (a count{'; n >= 1' if key == 'n' else ''}), "
                                      f"got {value!r}")
            elif not 0.0 <= value <= 1.0:
                raise RecordError(f"{where} must be a fraction in [0, 1] (87.3 % is 0.873), got {value!r}")
        for acc, count in [("top1", "n"), *((k, f"n@{k[5:]}") for k in values if k.startswith("top1@"))]:
            if acc in values and count in values and not consistent_with_count(values[acc], values[count]):
                raise RecordError(f"{source}: metrics[{ds[:40]!r}]: {acc} = {values[acc]!r} is not a whole number of "
                                  f"the {count} = {values[count]} samples")
        if is_count(primary.get(ds, "top1")):
            raise RecordError(f"{source}: primary_metric[{ds[:40]!r}] is the count {primary[ds][:40]!r}, not a score")
    for key, entry in data.get("summary", {}).items():
        value = entry["value"]
        if not 0.0 <= value <= 1.0:
            raise RecordError(f"{source}: summary[{key[:40]!r}] value must be a fraction in [0, 1], got {value!r}")
        parts = [metrics.get(d, {}).get(entry["metric"]) for d in entry["over"]]
        if entry["over"] and all(isinstance(p, (int, float)) for p in parts):
            mean = sum(parts) / len(parts)
            if abs(mean - value) > rounding(value) + max(rounding(p) for p in parts):
                raise RecordError(f"{source}: summary[{key[:40]!r}] = {value!r} contradicts the record's own "
                                  f"{entry['metric']} on {entry['over']} (their mean is {mean:.6g})")
    er = data.get("effective_robustness", {})
    per_shift = er.get("per_shift", {}) if isinstance(er.get("per_shift", {}), dict) else {}
    for key, value in [*er.items(), *per_shift.items()]:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
                math.isfinite(value) and -1.0 <= value <= 1.0):
            raise RecordError(f"{source}: effective_robustness[{str(key)[:40]!r}] must be a number in [-1, 1], "
                              f"got {value!r}")
