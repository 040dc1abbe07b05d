"""Result records: one JSON file per evaluated classifier, written atomically, checked when read.

All stored accuracies and effective-robustness values are fractions (0.873 = 87.3 %); reports
and tables convert to percent. A record names everything needed to reproduce it (the run config
and its hash, software versions) and to compare it (suite, reference, shifts, the baseline used).
A record read from disk may come from anyone, so every field's type, every value's range and the
consistency of counts and averages are checked before it reaches a board or a report.

Schema versions: 2 added ``summary`` (aggregates a paper reports without their parts) and the ``submitted``
kind; 3 added ``skipped_samples`` (left out by ``--on-bad-sample skip``); 4 added ``data`` (manifest hashes
of the shard sets scored and trained on) and, optionally, ``training`` (how a candidate was trained, with its
loss / lr / gradient-norm curve). Older files load unchanged.
"""
from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Literal, get_args

from robustbench_ft.util import DuplicateKeyError, atomic_write_text, stable_hash, unique_keys

SCHEMA_VERSION = 4
SUPPORTED_SCHEMA_VERSIONS = (1, 2, 3, 4)
RECORD_KINDS = ("reproduced", "published", "baseline", "submitted")


Endpoint = Literal["zeroshot", "finetuned"]
ENDPOINTS: tuple[str, ...] = get_args(Endpoint)
Choice = Literal["fixed", "val", "oracle"]
CHOICES: tuple[str, ...] = get_args(Choice)
"""How a candidate's hyper-parameter (α) was chosen: fixed before any result, on the val split, or one of a
sweep whose best row would be chosen on test data (an oracle: unranked on the leaderboard)."""


@dataclass(frozen=True)
class Placement:
    """Where a candidate sits in a report: its α on an interpolation curve, the curve (points of one curve
    are joined in α order), which end of the curve it is, and the method behind the fine-tuned end.

    ``choice`` says how the candidate's α was chosen (:data:`CHOICES`). Stored in a record's ``tags`` under
    these names (``{"alpha": 0.5, "curve": "wise-ft/finetune"}``); this class is the one place that knows them.
    """

    alpha: float | None = None
    curve: str | None = None
    endpoint: str | None = None
    base: str | None = None
    choice: str | None = None

    def tags(self) -> dict[str, Any]:
        return {k: (float(v) if k == "alpha" else v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_tags(cls, tags: dict[str, Any]) -> "Placement":
        """The placement a record's tags give (values of the wrong type, from a hand-made file, count as unset)."""
        alpha = tags.get("alpha")
        texts = {k: tags.get(k) if isinstance(tags.get(k), str) else None
                 for k in ("curve", "endpoint", "base", "choice")}
        number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)
        return cls(float(alpha) if number else None, **texts)


class RecordError(ValueError):
    """A record file that is not a valid result record."""


@dataclass
class ResultRecord:
    record_id: str                                # stable: same config + candidate -> same id
    suite: str
    model: str
    pretrained: str
    method: str
    candidate: str                                # display name, e.g. "wise-ft α=0.50"
    reference: str                                # reference dataset name
    shifts: list[str]
    metrics: dict[str, dict[str, float]]          # dataset -> {"top1": ..., "n": ..., <metric>: ...}
    primary_metric: dict[str, str] = field(default_factory=dict)  # dataset -> key in metrics used for ranking/ER
    tags: dict[str, Any] = field(default_factory=dict)             # e.g. {"alpha": 0.5, "base": "finetune"}
    effective_robustness: dict[str, Any] = field(default_factory=dict)  # see robustness.attach_effective_robustness
    kind: str = "reproduced"                      # reproduced | published | baseline | submitted
    citation: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    created: str = ""
    # Aggregates reported without their parts: name -> {"metric", "value", "over": [datasets], "std"?,
    # "note"?}; e.g. {"shift-avg": {"metric": "top1", "value": 0.602, "over": [five shifts]}}.
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Unreadable samples left out (``--on-bad-sample skip``): dataset -> {"count": N, "events": [{"shard",
    # "key" (None: the rest of a shard, or all of it), "count", "reason"}, ...], "events_omitted": k}.
    # The dataset's metrics are over the samples read ("n"); a dataset not listed lost none.
    skipped_samples: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The data it was scored on: "dataset/split" -> the shard set's manifest content hash (see
    # datasets.build.data_identity); part of record_id, so changed shards are never served this record.
    data: dict[str, str] = field(default_factory=dict)
    # How a trained candidate was trained (optional, within schema 4): steps, epochs, final_loss,
    # global_batch, accum_steps, micro_batch (per device and micro-step), devices, device_type, and
    # "curve": {"step", "loss", "lr", "grad_norm"} lists (at most 200 points; see methods.curves). {} if
    # none. Its peak memory is in ``timings`` (train_peak_cuda_allocated_mb / train_peak_process_rss_mb).
    training: dict[str, Any] = field(default_factory=dict)
    # Robust accuracy on perturbed copies of the reference test set (optional, within schema 4; see
    # perturbations.evaluate): name (``linf-4/255``, ``corruptions-s3``) -> {"top1", "clean_top1" (same samples),
    # "n", attack / norm / eps / package / package_version ...}. Not shifts: no effective robustness for them.
    perturbations: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def score(self, dataset: str) -> float:
        """The dataset's primary metric (top-1 unless the dataset spec says otherwise)."""
        key = self.primary_metric.get(dataset, "top1")
        return float(self.metrics[dataset][key])

    @property
    def reference_score(self) -> float:
        return self.score(self.reference)

    @property
    def shift_mean(self) -> float:
        """The record's reported mean over all its shifts (``summary``) if it has one, else the
        mean primary metric over the shifts it has scores for (NaN if none)."""
        reported = self.summary_score("shift-avg", self.shifts)
        if reported is not None:
            return reported
        present = [s for s in self.shifts if s in self.metrics]
        return sum(self.score(s) for s in present) / len(present) if present else float("nan")

    def summary_score(self, key: str, over: Iterable[str]) -> float | None:
        """Reported aggregate ``key`` if it is over exactly the datasets ``over``, else None: a mean
        over other shifts is a different number and must not stand in for it."""
        entry = self.summary.get(key)
        if not entry or sorted(entry.get("over", [])) != sorted(over):
            return None
        return float(entry["value"])

    @property
    def placement(self) -> Placement:
        return Placement.from_tags(self.tags)

    @property
    def seed(self) -> int | None:
        """The seed of the run that made the record (None for a published or hand-made one)."""
        seed = self.config.get("seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def seed_group(self) -> str:
        """What the record shares with the same run at other seeds: records with one ``seed_group`` are one
        method's result over seeds (mean ± std on the board). The run's resolved identity without its seed,
        and the candidate; a record without a run config is a group of its own."""
        identity = self.config.get("resolved")
        if not isinstance(identity, dict):
            return self.record_id
        return stable_hash([{k: v for k, v in identity.items() if k != "seed"}, self.candidate, self.suite])[:16]

    def skipped_note(self) -> str:
        """"dataset: N skipped" per dataset that lost unreadable samples ("" if none), for tables."""
        return "; ".join(f"{ds}: {int(entry.get('count', 0))} skipped" for ds, entry in self.skipped_samples.items())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "ResultRecord":
        if not isinstance(data, dict):
            raise RecordError(f"{source}: a result record is a JSON object, got {type(data).__name__}")
        version = data.get("schema_version", SCHEMA_VERSION)
        if version not in SUPPORTED_SCHEMA_VERSIONS or isinstance(version, bool):
            raise RecordError(f"{source}: schema_version {version!r} is not supported "
                              f"(this version reads {list(SUPPORTED_SCHEMA_VERSIONS)}); upgrade robustbench-ft")
        known = {f.name for f in fields(cls)}
        required = {"record_id", "suite", "model", "pretrained", "method", "candidate", "reference", "shifts", "metrics"}
        missing = sorted(required - data.keys())
        if missing:
            raise RecordError(f"{source}: missing required field(s) {missing}")
        unknown = sorted(data.keys() - known)
        if unknown:
            raise RecordError(f"{source}: unknown field(s) {unknown}")
        if version == 1 and "summary" in data:
            raise RecordError(f"{source}: field 'summary' needs schema_version 2 (the file says 1)")
        if version < 3 and data.get("skipped_samples"):
            raise RecordError(f"{source}: field 'skipped_samples' needs schema_version 3 (the file says {version})")
        for name in ("data", "training", "perturbations"):
            if version < 4 and data.get(name):
                raise RecordError(f"{source}: field {name!r} needs schema_version 4 (the file says {version})")
        _check_types(data, source)
        _check_values(data, source)
        record = cls(**{**data, "schema_version": SCHEMA_VERSION})
        if record.kind not in RECORD_KINDS:
            raise RecordError(f"{source}: kind {record.kind!r} is not one of {RECORD_KINDS}")
        return record


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


def _check_types(data: dict[str, Any], source: str) -> None:
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


def _check_values(data: dict[str, Any], source: str) -> None:
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


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("robustbench-ft", "torch", "torchvision", "open_clip_torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_record(record: ResultRecord, path: Path) -> Path:
    atomic_write_text(Path(path), json.dumps(record.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return Path(path)


def load_record(path: Path) -> ResultRecord:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); delete or regenerate it") from exc
    except DuplicateKeyError as exc:
        raise RecordError(f"{path}: {exc}") from None
    return ResultRecord.from_dict(data, source=str(path))


def iter_record_files(paths: Iterable[Path]) -> list[Path]:
    """Record files named directly or found (recursively, *.json, skipping hidden names) under
    directories, sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():  # hidden files and directories are temporary (atomic writes in progress)
            files.extend(sorted(q for q in p.rglob("*.json")
                                if not any(part.startswith(".") for part in q.relative_to(p).parts)))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no result record or directory at {p}")
    return files


def load_records(paths: Iterable[Path]) -> list[ResultRecord]:
    return [load_record(p) for p in iter_record_files(paths)]
