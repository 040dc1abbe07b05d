"""Result records: one JSON file per evaluated classifier, written atomically.

All stored accuracies and effective-robustness values are fractions (0.873 = 87.3 %); reports
and tables convert to percent. A record names everything needed to reproduce it (the run config
and its hash, software versions) and to compare it (suite, reference, shifts, the baseline used).
"""
from __future__ import annotations

import json
import os
import platform
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
RECORD_KINDS = ("reproduced", "published", "baseline")


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
    kind: str = "reproduced"                      # reproduced | published | baseline
    citation: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    created: str = ""
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
        """Mean primary metric over the shifts the record has."""
        present = [s for s in self.shifts if s in self.metrics]
        return sum(self.score(s) for s in present) / len(present) if present else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "ResultRecord":
        if not isinstance(data, dict):
            raise RecordError(f"{source}: a result record is a JSON object, got {type(data).__name__}")
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise RecordError(f"{source}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        known = {f.name for f in fields(cls)}
        required = {"record_id", "suite", "model", "pretrained", "method", "candidate", "reference", "shifts", "metrics"}
        missing = sorted(required - data.keys())
        if missing:
            raise RecordError(f"{source}: missing required field(s) {missing}")
        unknown = sorted(data.keys() - known)
        if unknown:
            raise RecordError(f"{source}: unknown field(s) {unknown}")
        record = cls(**data)
        if record.kind not in RECORD_KINDS:
            raise RecordError(f"{source}: kind {record.kind!r} is not one of {RECORD_KINDS}")
        return record


def slugify(text: str) -> str:
    """A file-system-safe name for a candidate or run ("wise-ft α=0.50" -> "wise-ft-alpha-0.50")."""
    text = text.replace("α", "alpha").replace("=", "-")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.").lower() or "record"


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, then rename: readers see the old
    file or the whole new one, never a truncated one, even if the process is killed mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; records and reports are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_record(record: ResultRecord, path: Path) -> Path:
    atomic_write_text(Path(path), json.dumps(record.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return Path(path)


def load_record(path: Path) -> ResultRecord:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); delete or regenerate it") from exc
    return ResultRecord.from_dict(data, source=str(path))


def iter_record_files(paths: Iterable[Path]) -> list[Path]:
    """Record files named directly or found (recursively, *.json) under directories, sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*.json") if not q.name.startswith(".")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no result record or directory at {p}")
    return files


def load_records(paths: Iterable[Path]) -> list[ResultRecord]:
    return [load_record(p) for p in iter_record_files(paths)]


def records_to_frame(records: Iterable[ResultRecord]):
    """Long-format pandas DataFrame: one row per (record, dataset) with the primary score."""
    import pandas as pd

    rows = []
    for r in records:
        for ds in r.metrics:
            rows.append({
                "record_id": r.record_id, "suite": r.suite, "model": r.model, "method": r.method,
                "candidate": r.candidate, "kind": r.kind, "dataset": ds,
                "role": "reference" if ds == r.reference else ("shift" if ds in r.shifts else "other"),
                "score": r.score(ds), **{f"tag_{k}": v for k, v in r.tags.items()},
            })
    return pd.DataFrame(rows)
