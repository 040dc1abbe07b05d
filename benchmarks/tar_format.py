"""Does the hand-written tar format of the shards still beat Python's ``tarfile``? (issue 12)

Writes the same samples (JPEG bytes of the benchmark's synthetic images, their labels) into a shard
with the harness's writer (``shards.writer.ShardFile``: headers built directly, sha256 while writing)
and with ``tarfile`` (PAX headers, mtime 0, then a second pass for the sha256, which a manifest needs),
and reads every member back with the harness's reader (``shards.tarformat.iter_shard_samples``: the
member spans the training index stores) and with ``tarfile`` (iterating members and reading them).
The two writers produce byte-identical files (checked). Rounds alternate the two sides; the median
of the per-round ratios is printed.

    python benchmarks/tar_format.py            # 4,000 samples, 5 rounds
    python benchmarks/tar_format.py --quick
"""
from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import sys
import tarfile
import time
from pathlib import Path

import _common as common
import numpy as np

from robustbench_ft.shards.tarformat import iter_shard_samples, read_span
from robustbench_ft.shards.writer import ShardFile


def samples(n: int, size: tuple[int, int]) -> list[tuple[str, bytes, int]]:
    rng = np.random.default_rng(0)
    images = [common.textured(*size, rng) for _ in range(min(n, 64))]  # bytes are reused: only tar work is timed
    encoded = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
    return [(f"s{i:07d}", encoded[i % len(encoded)], i % 10) for i in range(n)]


def write_ours(path: Path, items) -> str:
    shard = ShardFile(path, "jpg", 10)
    for key, data, label in items:
        shard.add(key, data, label)
    return shard.finish().sha256


def write_tarfile(path: Path, items) -> str:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, data, label in items:
            for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_ours(path: Path) -> int:
    total = 0
    with open(path, "rb") as f:
        for _key, spans in iter_shard_samples(f, path):
            for span in spans.values():
                total += len(read_span(f, span, str(path)))
    return total


def read_tarfile(path: Path) -> int:
    total = 0
    with tarfile.open(path, "r") as tar:
        for member in tar:
            total += len(tar.extractfile(member).read())
    return total


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.rounds = 500, 2
    work = common._temporary_dir("rbft-tar-")
    items = samples(args.samples, (500, 375))
    write_ratio, read_ratio = [], []
    for r in range(args.rounds):
        ours, theirs = work / f"ours-{r}.tar", work / f"tarfile-{r}.tar"
        t_ours, digest_ours = timed(write_ours, ours, items)
        t_theirs, digest_theirs = timed(write_tarfile, theirs, items)
        if digest_ours != digest_theirs:
            raise SystemExit("the two writers disagree: the harness's shards are no longer tarfile-identical")
        r_ours, n_ours = timed(read_ours, ours)
        r_theirs, n_theirs = timed(read_tarfile, theirs)
        assert n_ours == n_theirs
        write_ratio.append(t_theirs / t_ours)
        read_ratio.append(r_theirs / r_ours)
        print(f"round {r}: write ours {t_ours:.3f}s tarfile {t_theirs:.3f}s; read ours {r_ours:.3f}s "
              f"tarfile {r_theirs:.3f}s", file=sys.stderr)
    mib = ours.stat().st_size / 2 ** 20
    print(f"\n== tar format, {args.samples} samples ({mib:.0f} MiB per shard), {args.rounds} rounds "
          f"({common.conditions()})")
    print(f"write + sha256: tarfile / ours = {statistics.median(write_ratio):.2f}x (median of rounds)")
    print(f"read members:   tarfile / ours = {statistics.median(read_ratio):.2f}x (median of rounds)")
    print("bytes: identical (sha256 equal every round)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
