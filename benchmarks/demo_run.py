"""Wall time and peak memory of the README's main command on the embedded demo.

Runs `robustbench-ft run --method wise-ft --alpha 0.5` twice in a fresh working directory (first
run: builds shards and fine-tunes; second run: everything cached) and samples the resident memory
of the whole process tree (main process + DataLoader workers) every 0.1 s.

    python benchmarks/demo_run.py [--keep DIR] [-- extra run flags]

Targets (issue 3): first run < 180 s and < 4 GB peak on a 2-core CPU machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _tree_rss_bytes(root: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    stack.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def measure(cmd: list[str], cwd: Path) -> tuple[float, int, int]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_bytes(proc.pid))
        time.sleep(0.1)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        print(out[-3000:])
        raise SystemExit(f"command failed with exit code {proc.returncode}")
    summary = out[out.find("\ncandidate"):] if "\ncandidate" in out else out[-1500:]
    print(summary.strip())
    return time.perf_counter() - start, peak, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    parser.add_argument("extra", nargs="*", help="extra flags for `run`")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="rbft-demo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("robustbench-ft") or str(Path(sys.executable).with_name("robustbench-ft"))
    cmd = [exe, "run", "--method", "wise-ft", "--alpha", "0.5", *args.extra]
    print(f"cpus: {os.cpu_count()}  work dir: {work}\ncommand: {' '.join(cmd)}\n")
    results = {}
    for label in ("first run (builds shards, fine-tunes)", "second run (cached)"):
        print(f"== {label}")
        wall, peak, _ = measure(cmd, work)
        results[label] = (wall, peak)
        print(f"   wall {wall:.1f} s   peak RSS (process tree) {peak / 2**30:.2f} GiB\n")
    first_wall, first_peak = results["first run (builds shards, fine-tunes)"]
    print(f"first run: {first_wall:.1f} s = {first_wall / 180:.2f}x the 180 s target; "
          f"peak {first_peak / 2**30:.2f} GiB = {first_peak / 4e9:.2f}x the 4 GB target")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
