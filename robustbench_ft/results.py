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
from pathlib import Path
from typing import Any, Iterable, Literal, get_args

from robustbench_ft.record_checks import RecordError, check_types, check_values
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
    def shots(self) -> int | None:
        """K of a k-shot record (``run --shots K``, or a published few-shot entry's ``tags.shots``); None if none."""
        shots = self.tags.get("shots")
        return shots if isinstance(shots, int) and not isinstance(shots, bool) else None

    @property
    def label(self) -> str:
        """The candidate as tables show it: with its K where it is a k-shot result."""
        return self.candidate if self.shots is None else f"{self.candidate} ({self.shots}-shot)"

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
        check_types(data, source)
        check_values(data, source)
        record = cls(**{**data, "schema_version": SCHEMA_VERSION})
        if record.kind not in RECORD_KINDS:
            raise RecordError(f"{source}: kind {record.kind!r} is not one of {RECORD_KINDS}")
        return record


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
