"""Reading the samples of one shard: members grouped by key, the label parsed, damage named (never a bare
``tarfile`` error).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from robustbench_ft.shards.manifest import IMAGE_FORMATS, REBUILD_HINT, ShardError
from robustbench_ft.shards.tarformat import TarFormatError, iter_shard_samples, read_span


@dataclass(frozen=True)
class RawSample:
    """One sample as stored: the image still encoded (decoding is the reader's job)."""

    key: str
    image_bytes: bytes
    image_ext: str
    label: int
    meta: dict | None


@dataclass(frozen=True)
class BadSample:
    """A sample that is in the shard but does not parse (see ``read_shard(keep_bad=True)``)."""

    key: str
    error: str


def image_member(path: Path, key: str, members: Iterable[str]) -> str:
    """The image extension of a sample, which must have exactly one image and a ``cls`` label."""
    image_exts = [ext for ext in members if ext in IMAGE_FORMATS]
    if len(image_exts) != 1 or "cls" not in members:
        raise ShardError(
            f"shard {path}: sample {key!r} has members {sorted(members)}; expected one image "
            f"({'/'.join(IMAGE_FORMATS)}) and a 'cls' label (truncated or foreign shard?); {REBUILD_HINT}"
        )
    return image_exts[0]


def parse_label(path: Path, key: str, raw: bytes, num_classes: int) -> int:
    """A sample's ``.cls`` member as a class index in ``0..num_classes-1``."""
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ShardError(f"shard {path}: sample {key!r} has label {raw!r}, not an integer; {REBUILD_HINT}") from None
    if not 0 <= label < num_classes:
        raise ShardError(f"shard {path}: sample {key!r} has label {label} outside 0..{num_classes - 1}; {REBUILD_HINT}")
    return label


def read_shard(path: Path, num_classes: int, expected_samples: int | None = None, *,
               keep_bad: bool = False) -> Iterator[RawSample | BadSample]:
    """Stream the samples of one shard in stored order, still encoded.

    Every failure becomes a :class:`ShardError` naming the shard (and key): tar damage, a sample
    without image or label, an unparsable label or metadata, a label out of range, and a count that
    differs from ``expected_samples``. With ``keep_bad=True`` a sample whose members do not parse
    is yielded as a :class:`BadSample` in its place instead (so positions stay manifest positions)
    and the shard reads on; damage to the tar itself still raises.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} is missing; {REBUILD_HINT}")
    count = 0
    try:
        with open(path, "rb") as f:
            for key, members in iter_shard_samples(f, path):
                data = {ext: read_span(f, span, f"member {key}.{ext}") for ext, span in members.items()}
                yield _sample_or_bad(path, key, data, num_classes, keep_bad)
                count += 1
    except (TarFormatError, ValueError, UnicodeDecodeError, OSError) as e:
        raise ShardError(
            f"shard {path} is unreadable after {count} samples ({e}): it is truncated or corrupt; {REBUILD_HINT}"
        ) from e
    if expected_samples is not None and count != expected_samples:
        raise ShardError(
            f"shard {path} holds {count} samples but the manifest says {expected_samples}: it is truncated "
            f"or was replaced; {REBUILD_HINT}"
        )


def _sample_or_bad(path: Path, key: str, group: dict[str, bytes], num_classes: int,
                   keep_bad: bool) -> RawSample | BadSample:
    try:
        return make_sample(path, key, group, num_classes)
    except ShardError as e:
        if not keep_bad:
            raise
        return BadSample(key, str(e))


def make_sample(path: Path, key: str, group: dict[str, bytes], num_classes: int) -> RawSample:
    image_ext = image_member(path, key, group)
    label = parse_label(path, key, group["cls"], num_classes)
    meta = None
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except ValueError as e:
            raise ShardError(f"shard {path}: sample {key!r} has unparsable metadata ({e}); {REBUILD_HINT}") from e
    return RawSample(key, group[image_ext], image_ext, label, meta)
