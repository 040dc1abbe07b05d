"""Submission bundles: a method's result records plus who made it, in one versioned JSON file.

``robustbench-ft submit`` writes a bundle; ``robustbench-ft leaderboard --add`` checks it and stores
its records under ``results/submissions/<name>/``. A bundle comes from someone else, so it is
checked as untrusted input before anything is written: the schema version, every field's type,
string lengths, numbers (finite; scores in [0, 1]; no NaN, infinity or absurd magnitudes), that
every record is on one known suite with its reference and only that suite's datasets, no record id
twice, and no markup characters in any text (the leaderboard escapes text anyway; refusing it
keeps bundles plain). Every problem found is listed in one ``SubmissionError`` message.

Format (``schema_version`` 1)::

    {"format": "robustbench-ft-submission", "schema_version": 1, "created": "<ISO time>",
     "method": {"name": "...", "paper": "https://...", "code": "https://...",
                "checkpoint": {"file": "model.safetensors", "sha256": "<64 hex>"}
                              | {"hf_hub": "org/repo", "revision": "<40 hex>", "file": "...", "sha256": "<64 hex>"}
                              | null},
     "records": [<result record>, ...]}

A checkpoint on the Hugging Face hub (``submit --checkpoint hf-hub:ORG/REPO[@REVISION][/FILE]``) is
recorded by repo, the commit the hub cache resolved, the file and its sha256, so that anyone can fetch
that exact file and check it.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from robustbench_ft.board.untrusted import UntrustedJSONError, parse_untrusted_json, unsafe_character
from robustbench_ft.results import RecordError, ResultRecord, now_iso, write_record
from robustbench_ft.util import atomic_write_text, file_sha256, slugify

BUNDLE_FORMAT = "robustbench-ft-submission"
BUNDLE_SCHEMA_VERSION = 1
MAX_BUNDLE_BYTES = 8 * 1024 * 1024
MAX_RECORDS = 1000
MAX_TEXT = 200           # any string in a record
MAX_URL = 500
MAX_CONFIG_BYTES = 64 * 1024
MAX_DEPTH = 12
MAX_MAGNITUDE = 1e12     # no count or setting in a record is larger
MAX_PROBLEMS = 20
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+()-]{0,79}")
RECORD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
URL_RE = re.compile(r"https?://[^\s<>\"'`\\]+")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
HUB_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
HUB_CHECKPOINT_KEYS = {"hf_hub", "revision", "file", "sha256"}

TOP_KEYS = {"format", "schema_version", "created", "method", "records"}
METHOD_KEYS = {"name", "paper", "code", "checkpoint"}


class SubmissionError(ValueError):
    """A bundle that cannot be accepted; the message lists every problem found."""


@dataclass(frozen=True)
class MethodInfo:
    name: str
    paper: str
    code: str
    checkpoint: dict[str, str] | None = None   # {"file": basename, "sha256": hex digest}


@dataclass(frozen=True)
class Bundle:
    method: MethodInfo
    records: list[ResultRecord]
    created: str = ""

    @property
    def suite(self) -> str:
        return self.records[0].suite

    @property
    def directory_name(self) -> str:
        return slugify(self.method.name)


def checkpoint_entry(checkpoint: str | Path) -> dict[str, Any]:
    """The bundle's ``method.checkpoint``: a local file by name and sha256, an hf-hub reference by repo,
    resolved commit, file and sha256 (fetched into the hub cache to hash it)."""
    from robustbench_ft.models.hub import fetch, is_hub

    if is_hub(checkpoint):
        found = fetch(str(checkpoint))
        return {"hf_hub": found.ref.repo, "revision": found.commit, "file": found.ref.filename or found.path.name,
                "sha256": found.sha256}
    return {"file": Path(checkpoint).name, "sha256": file_sha256(checkpoint)}


def make_bundle(records: Iterable[ResultRecord], *, name: str, paper: str, code: str,
                checkpoint: str | Path | None = None) -> dict[str, Any]:
    """The bundle for ``records`` (reproduced ones) and the method's metadata, validated, so that a
    submitter learns about a problem before sending the file rather than when it is refused."""
    data = {
        "format": BUNDLE_FORMAT, "schema_version": BUNDLE_SCHEMA_VERSION, "created": now_iso(),
        "method": {"name": name, "paper": paper, "code": code,
                   "checkpoint": None if checkpoint is None else checkpoint_entry(checkpoint)},
        "records": [r.to_dict() for r in records],
    }
    validate_bundle(json.loads(json.dumps(data, allow_nan=True)), source="the new bundle")
    return data


def write_bundle(bundle: dict[str, Any], path: Path) -> Path:
    text = json.dumps(bundle, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write_text(Path(path), text)
    return Path(path)


# --------------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------------

def read_bundle(path: Path) -> Bundle:
    """Parse and validate a bundle file (see ``validate_bundle``)."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"no submission bundle at {path}")
    size = path.stat().st_size
    if size > MAX_BUNDLE_BYTES:
        raise SubmissionError(f"{path}: {size} bytes is over the {MAX_BUNDLE_BYTES} byte limit of a bundle")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SubmissionError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = parse_untrusted_json(text)
    except UntrustedJSONError as exc:
        raise SubmissionError(f"{path}: {exc}") from None
    return validate_bundle(data, source=str(path))


class _Problems:
    """Collects problems so one refusal names all of them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self, source: str) -> None:
        if self.items:
            shown = self.items[:MAX_PROBLEMS]
            more = len(self.items) - len(shown)
            lines = "\n".join(f"  - {p}" for p in shown) + (f"\n  - … and {more} more" if more > 0 else "")
            raise SubmissionError(f"{source}: submission refused ({len(self.items)} problem"
                                  f"{'' if len(self.items) == 1 else 's'}):\n{lines}")


def _check_text(value: Any, where: str, problems: _Problems, limit: int = MAX_TEXT) -> bool:
    if not isinstance(value, str):
        problems.add(where, f"must be a string, got {type(value).__name__}")
        return False
    if len(value) > limit:
        problems.add(where, f"is {len(value)} characters long (at most {limit})")
        return False
    bad = unsafe_character(value)
    if bad is not None:
        problems.add(where, f"contains '<', '>', control, bidi or zero-width characters (here {bad}); use plain text")
        return False
    return True


def _walk(value: Any, where: str, problems: _Problems, depth: int = 0) -> None:
    """Every string short and plain, every number finite and of sane magnitude, nesting shallow."""
    if depth > MAX_DEPTH:
        problems.add(where, f"nested more than {MAX_DEPTH} levels deep")
    elif isinstance(value, dict):
        for k, v in value.items():
            label = repr(str(k)[:40])[1:-1]  # control characters shown escaped, never sent to the terminal
            _check_text(k, f"{where} key {label!r}", problems)
            _walk(v, f"{where}.{label}", problems, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk(v, f"{where}[{i}]", problems, depth + 1)
    elif isinstance(value, str):
        _check_text(value, where, problems)
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, (int, float)):
        if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            problems.add(where, f"number {value!r} is not finite or larger than {MAX_MAGNITUDE:g}")
    else:
        problems.add(where, f"unexpected value of type {type(value).__name__}")


def _check_keys(obj: dict, allowed: set[str], optional: set[str], where: str, problems: "_Problems") -> None:
    """Report required keys that are missing and keys that are not allowed (names cut to 40 characters)."""
    missing = sorted(allowed - optional - obj.keys())
    unknown = sorted(obj.keys() - allowed)
    if missing:
        problems.add(where, f"missing field(s) {missing}")
    if unknown:
        problems.add(where, f"unknown field(s) {[str(u)[:40] for u in unknown]}")


def _check_method(method: Any, problems: _Problems) -> MethodInfo | None:
    if not isinstance(method, dict):
        problems.add("method", "must be an object with name, paper, code and checkpoint")
        return None
    _check_keys(method, METHOD_KEYS, {"checkpoint"}, "method", problems)
    name, paper, code = method.get("name"), method.get("paper"), method.get("code")
    if "name" in method and _check_text(name, "method.name", problems, 80) and not NAME_RE.fullmatch(name):
        problems.add("method.name", "must start with a letter or digit and use only letters, digits, spaces "
                                    "and . _ + ( ) -, at most 80 characters")
    for key, url in (("paper", paper), ("code", code)):
        if key in method and _check_text(url, f"method.{key}", problems, MAX_URL) and not URL_RE.fullmatch(url):
            problems.add(f"method.{key}", "must be an http(s) URL without spaces or quotes")
    ckpt = method.get("checkpoint")
    if ckpt is not None:
        if not isinstance(ckpt, dict) or set(ckpt) not in ({"file", "sha256"}, HUB_CHECKPOINT_KEYS):
            problems.add("method.checkpoint", 'must be null, {"file": NAME, "sha256": HEX} or {"hf_hub": "ORG/REPO", '
                                              '"revision": COMMIT, "file": NAME, "sha256": HEX}')
        else:
            if "hf_hub" in ckpt:
                _check_hub_checkpoint(ckpt, problems)
            in_repo = "hf_hub" in ckpt  # a file of a hub repo may sit in a folder of it
            if _check_text(ckpt["file"], "method.checkpoint.file", problems) and (
                    ("/" in ckpt["file"] and not in_repo) or "\\" in ckpt["file"] or not ckpt["file"].strip()
                    or ".." in ckpt["file"] or ckpt["file"].startswith("/")):
                problems.add("method.checkpoint.file", "must be a file name, not a path"
                             + (" (or a path inside the hub repo)" if in_repo else ""))
            if not isinstance(ckpt["sha256"], str) or not SHA256_RE.fullmatch(ckpt["sha256"]):
                problems.add("method.checkpoint.sha256", "must be 64 lowercase hex digits (sha256)")
    if problems.items:
        return None
    return MethodInfo(name, paper, code, dict(ckpt) if ckpt else None)


def _check_hub_checkpoint(ckpt: dict[str, Any], problems: "_Problems") -> None:
    if not isinstance(ckpt["hf_hub"], str) or not HUB_REPO_RE.fullmatch(ckpt["hf_hub"]):
        problems.add("method.checkpoint.hf_hub", "must be a hub repo id ORG/REPO")
    if ckpt["revision"] is not None and (not isinstance(ckpt["revision"], str)
                                         or not COMMIT_RE.fullmatch(ckpt["revision"])):
        problems.add("method.checkpoint.revision", "must be the 40-hex commit the file came from (or null)")


def _check_record_values(record: ResultRecord, where: str, problems: _Problems) -> None:
    """What a submission adds to the checks every loaded record passes (``ResultRecord.from_dict``:
    ranges, counts, consistency): reproduced records only, safe ids, a bounded config."""
    if record.kind != "reproduced":
        problems.add(f"{where}.kind", f"is {record.kind!r}; a submission carries reproduced records only")
    if not RECORD_ID_RE.fullmatch(record.record_id):
        problems.add(f"{where}.record_id", "must be 1-128 letters, digits, '.', '_' or '-'")
    if len(json.dumps(record.config)) > MAX_CONFIG_BYTES:
        problems.add(f"{where}.config", f"is larger than {MAX_CONFIG_BYTES} bytes")


def _check_suite(records: list[ResultRecord], problems: _Problems) -> None:
    """One registered suite and reference; only that suite's datasets; a reference score each."""
    from robustbench_ft.datasets.registry import get_dataset, get_suite

    suites = sorted({r.suite for r in records})
    refs = sorted({r.reference for r in records})
    if len(suites) > 1:
        problems.add("records", f"mix suites {suites}; submit one bundle per suite")
        return
    if len(refs) > 1:
        problems.add("records", f"mix reference datasets {refs}")
        return
    try:
        suite = get_suite(suites[0])
    except KeyError as exc:
        problems.add("records", f"suite: {exc.args[0]}")
        return
    if refs[0] != suite.reference:
        problems.add("records", f"reference {refs[0]!r} is not suite {suite.name!r}'s reference {suite.reference!r}")
    known = set(suite.eval_datasets)
    for i, r in enumerate(records):
        where = f"records[{i}] ({r.record_id[:40]})"
        unknown = sorted(d for d in {*r.metrics, *r.shifts} if d not in known)
        if unknown:
            problems.add(where, f"datasets {[u[:40] for u in unknown]} are not in suite {suite.name!r} "
                                f"(it has {sorted(known)})")
        if suite.reference not in r.metrics:
            problems.add(where, f"has no score on the reference {suite.reference!r}")
        for ds in sorted(set(r.metrics) & known):  # ranked by the metric the dataset declares, nothing else
            declared, named = get_dataset(ds).metric, r.primary_metric.get(ds, "top1")
            if named != declared:
                problems.add(where, f"primary metric of {ds!r} is {named[:40]!r}, but {ds!r} is scored by {declared!r}")


def validate_bundle(data: Any, source: str = "<bundle>") -> Bundle:
    """The bundle in ``data`` (parsed JSON) if it is acceptable; otherwise ``SubmissionError``
    listing every problem (see the module docstring for the rules)."""
    problems = _Problems()
    if not isinstance(data, dict):
        raise SubmissionError(f"{source}: a submission bundle is a JSON object, got {type(data).__name__}")
    if data.get("format") != BUNDLE_FORMAT:
        raise SubmissionError(f"{source}: not a submission bundle (expected \"format\": \"{BUNDLE_FORMAT}\"); "
                              f"make one with `robustbench-ft submit`")
    version = data.get("schema_version")
    if version != BUNDLE_SCHEMA_VERSION or isinstance(version, bool):
        raise SubmissionError(f"{source}: bundle schema_version {str(version)[:20]!r} is not supported "
                              f"(expected {BUNDLE_SCHEMA_VERSION})")
    _check_keys(data, TOP_KEYS, {"created"}, "bundle", problems)
    _walk(data, "bundle", problems)
    problems.raise_if_any(source)  # the checks below assume plain, bounded values
    if "created" in data:
        _check_text(data["created"], "created", problems, 40)
    method = _check_method(data["method"], problems)
    raw = data["records"]
    if not isinstance(raw, list) or not raw:
        problems.add("records", "must be a non-empty list of result records")
        problems.raise_if_any(source)
    if len(raw) > MAX_RECORDS:
        problems.add("records", f"{len(raw)} records is over the limit of {MAX_RECORDS}")
        problems.raise_if_any(source)
    records: list[ResultRecord] = []
    for i, item in enumerate(raw):
        where = f"records[{i}]"
        try:
            record = ResultRecord.from_dict(item, source=where)
        except (RecordError, TypeError) as exc:
            problems.add(where, str(exc).removeprefix(f"{where}: "))
            continue
        _check_record_values(record, where, problems)
        records.append(record)
    ids = [slugify(r.record_id) for r in records]  # they name the stored files
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        problems.add("records", f"record ids appear more than once (ignoring case): {[d[:40] for d in dupes]}")
    if records and len(records) == len(raw):
        _check_suite(records, problems)
    problems.raise_if_any(source)
    assert method is not None
    return Bundle(method, records, str(data.get("created", "")))


# --------------------------------------------------------------------------------------------
# Accepting
# --------------------------------------------------------------------------------------------

def submissions_dir(results_dir: Path) -> Path:
    return Path(results_dir) / "submissions"


def add_bundle(path: Path, results_dir: Path = Path("results")) -> list[Path]:
    """Validate the bundle at ``path`` and store its records as ``kind == "submitted"`` under
    ``<results_dir>/submissions/<name>/``, all or nothing: they are written into a hidden
    temporary directory that is renamed into place (readers skip hidden directories)."""
    bundle = read_bundle(path)
    parent = submissions_dir(results_dir)
    target = parent / bundle.directory_name
    if target.exists():
        raise SubmissionError(f"a submission named {bundle.method.name!r} already exists at {target}; "
                              f"choose another name, or remove that directory to replace it")
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{bundle.directory_name}."))
    try:
        os.chmod(staging, 0o755)
        paths = []
        info = {"name": bundle.method.name, "paper": bundle.method.paper, "code": bundle.method.code,
                "checkpoint_sha256": (bundle.method.checkpoint or {}).get("sha256", ""), "created": bundle.created}
        hub = bundle.method.checkpoint or {}
        if hub.get("hf_hub"):
            info["checkpoint_hf_hub"] = f"hf-hub:{hub['hf_hub']}" + (f"@{hub['revision']}" if hub["revision"] else "") \
                + f"/{hub['file']}"
        for record in bundle.records:
            record.kind = "submitted"
            record.citation = bundle.method.paper
            record.tags = {**record.tags, "submission": info}
            name = f"{slugify(record.record_id)}.json"
            write_record(record, staging / name)
            paths.append(target / name)
        try:
            os.rename(staging, target)
        except OSError:
            if target.exists():
                raise SubmissionError(f"a submission named {bundle.method.name!r} appeared at {target} "
                                      f"meanwhile; choose another name") from None
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return paths
