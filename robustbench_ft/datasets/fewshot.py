"""The k-shot protocol (``run --shots K``): a class-balanced K-per-class subset of the suite's training
split, drawn by the run's seed, and (as FLYP does it) a K-per-class subset of its held-out split.

FLYP (Goyal et al., "Finetune like you pretrain", CVPR 2023; locuslab/FLYP @ 215d5bb, ``src/few_shot.py``)
trains on the first k images of each class met in a shuffled training loader and early-stops on k images
per class drawn the same way from the *validation* set; it repeats this 50 times with new draws and
reports mean and std. Here each seed of ``--seeds`` is one repetition: the subset is drawn without
replacement, per class, by a generator seeded with (seed, K, split role), so the same seed gives the
same shots on any machine and worker count, and different seeds give different shots.

The subset is written as a shard set of its own under ``<cache-dir>/fewshot/`` (the images copied
byte for byte, labels and metadata kept, in the source's manifest order), so every method that reads
``ctx.split_dir("train"|"val")`` trains and chooses on the shots without knowing about them. The sha256
of the chosen sample keys (sorted) identifies the subset: it is part of the run's data identity (so of
every checkpoint and record key) and of the record's ``tags``.

Departures from FLYP: the shots are drawn by seed rather than by an unseeded loader shuffle; the
held-out K-per-class subset is what every held-out choice of the method uses (α on val, TPGM's radii),
and FLYP's per-epoch checkpoint selection by the lowest cross-entropy on it is not implemented.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import numpy as np

from robustbench_ft.loading.training_batches import load_index
from robustbench_ft.shards.manifest import MANIFEST_FILE, Manifest, ShardError
from robustbench_ft.shards.tarformat import iter_shard_samples, read_span
from robustbench_ft.shards.writer import ShardWriter

if TYPE_CHECKING:
    from robustbench_ft.config import RunConfig

Role = Literal["train", "val"]
_ROLE_STREAM = {"train": 0, "val": 1}  # independent draws for the two roles under one seed
SAMPLES_PER_SHARD = 1000


class ShotsError(ValueError):
    """A k-shot subset cannot be drawn (K larger than a class's count, no such split)."""


@dataclass(frozen=True)
class ShotSubset:
    """A drawn subset: its shard directory, K, the source split and the hash of its sample keys."""

    directory: Path
    shots: int
    source: str        # "dataset/split"
    keys_hash: str     # sha256 of the sorted chosen keys, joined by newlines

    @property
    def data_key(self) -> str:
        """Its entry in a run's data identity (beside the full split's ``dataset/split``)."""
        return f"{self.source}/{self.shots}-shot"


def draw_positions(labels: np.ndarray, classes: tuple[str, ...], shots: int, seed: int, role: Role,
                   where: str) -> np.ndarray:
    """Manifest positions of ``shots`` samples of every class, drawn without replacement, sorted.

    A class with fewer than ``shots`` samples is refused, naming it and its count."""
    counts = np.bincount(labels, minlength=len(classes))
    short = [(classes[c], int(n)) for c, n in enumerate(counts) if n < shots]
    if short:
        named = ", ".join(f"{name!r} has {n}" for name, n in short[:5]) + (" ..." if len(short) > 5 else "")
        raise ShotsError(f"--shots {shots}: {where} has fewer than {shots} samples in {len(short)} class(es) "
                         f"({named}); pass a smaller --shots (at most {int(counts.min())} here)")
    rng = np.random.default_rng([seed, shots, _ROLE_STREAM[role]])
    chosen = [rng.choice(np.flatnonzero(labels == c), size=shots, replace=False) for c in range(len(classes))]
    return np.sort(np.concatenate(chosen))


def keys_hash(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode("ascii")).hexdigest()


def ensure_subset(source: Path, source_name: str, cache_dir: Path, shots: int, seed: int, role: Role, *,
                  log: Callable[[str], None] = print) -> ShotSubset:
    """The K-per-class subset of the shard set ``source`` for ``seed`` and ``role``, written once."""
    manifest = Manifest.load(source)
    index = load_index(source, manifest)
    positions = draw_positions(np.asarray(index.label), manifest.classes, shots, seed, role, source_name)
    keys = [index.key[p].decode("ascii") for p in positions]
    digest = keys_hash(keys)
    out = Path(cache_dir) / "fewshot" / f"{source_name.replace('/', '-')}-{shots}shot-{digest[:16]}"
    if _complete(out, digest, len(keys)):
        return ShotSubset(out, shots, source_name, digest)
    log(f"drawing {shots} shots per class from {source_name} (seed {seed}) -> {out}")
    _write_subset(source, manifest, positions, out, {"fewshot": {"source": source_name, "shots": shots,
                                                                 "seed": seed, "role": role, "keys_sha256": digest,
                                                                 "source_content": manifest.content_hash()}})
    return ShotSubset(out, shots, source_name, digest)


def _complete(out: Path, digest: str, count: int) -> bool:
    if not (out / MANIFEST_FILE).is_file():
        return False
    try:
        manifest = Manifest.load(out)
    except ShardError:
        return False
    return manifest.metadata.get("fewshot", {}).get("keys_sha256") == digest and manifest.num_samples == count


def _write_subset(source: Path, manifest: Manifest, positions: np.ndarray, out: Path, metadata: dict) -> None:
    """Copy the chosen samples (image bytes, label, metadata) into a new shard set at ``out``."""
    wanted = set(int(p) for p in positions)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    name = "fewshot"
    with ShardWriter(tmp, name, manifest.classes, samples_per_shard=SAMPLES_PER_SHARD,
                     image_format=manifest.image_format, resize_shorter=manifest.resize_shorter,
                     metadata={**manifest.metadata, **metadata}) as writer:
        position = 0
        for info in manifest.shards:
            end = position + info.num_samples
            if not wanted.intersection(range(position, end)):
                position = end
                continue
            path = source / info.name
            with open(path, "rb") as f:
                for i, (key, members) in enumerate(iter_shard_samples(f, path)):
                    if position + i not in wanted:
                        continue
                    image_ext = manifest.image_format
                    data = read_span(f, members[image_ext], f"member {key}.{image_ext}")
                    label = int(read_span(f, members["cls"], f"member {key}.cls").decode("ascii").strip())
                    meta = json.loads(read_span(f, members["json"], f"member {key}.json")) if "json" in members \
                        else None
                    writer.write(key, data, label, meta)
            position = end
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def draw_subsets(config: "RunConfig", sources: dict[str, Path], names: dict[str, str], *,
                 log: Callable[[str], None] = print) -> dict[str, ShotSubset]:
    """The ``--shots`` subsets of a run: role ("train", "val") -> subset of the full split ``sources[role]``,
    drawn by ``config.seed`` (under torchrun rank 0 writes them, the others then find them)."""
    from robustbench_ft import distributed

    assert config.shots is not None
    with distributed.main_first():
        return {role: ensure_subset(sources[role], names[role], Path(config.cache_dir), config.shots, config.seed,
                                    role, log=log)  # type: ignore[arg-type]
                for role in sources}


def shot_data(subsets: dict[str, ShotSubset]) -> dict[str, str]:
    """The subsets' entries in a run's data identity: ``dataset/split/K-shot`` -> keys hash."""
    return {s.data_key: s.keys_hash for s in subsets.values()}


def shot_tags(subsets: dict[str, ShotSubset]) -> dict[str, object]:
    """What a record says of its k-shot run: ``shots`` (K) and ``shot_keys`` (role -> keys hash)."""
    if not subsets:
        return {}
    return {"shots": next(iter(subsets.values())).shots,
            "shot_keys": {role: s.keys_hash for role, s in sorted(subsets.items())}}
