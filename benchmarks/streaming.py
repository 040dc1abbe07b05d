"""Streaming evaluation: images/s streamed over loopback HTTP vs from the same local files (target >= 0.9x).

One run, one synthetic JPEG shard set (ImageNet-sized images, see ``_common``), served by a separate
``python -m http.server`` process on 127.0.0.1 (a server in this process would compete for its
GIL). Two measurements, each side by side, in alternating order, ``--rounds`` times: (1) the input
pipeline alone (workers read, hash and decode; no model), (2) a full ``evaluate`` pass with the
benchmark model. The ratio reported is the median over rounds of each round's streamed/local
throughput (the two sides of a round run back to back, so load that drifts between rounds on a shared
machine disturbs it less). Local passes read with the default ``verify="hash"`` (a shard's sha256 is
remembered once checked); streamed passes hash every shard as it arrives, every time.

    python benchmarks/streaming.py            # 2048 images, 2 workers
    python benchmarks/streaming.py --quick
"""
from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import _common as common

from robustbench_ft.evaluation.dataset_pass import evaluate
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.evaluation.pipeline import eval_pipeline
from robustbench_ft.loading.loader import make_loader
from robustbench_ft.models.classifier import Classifier


@contextmanager
def http_server(directory: Path):
    """``http://127.0.0.1:PORT`` serving ``directory`` from a child process, for the block's duration."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/manifest.json", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("the benchmark's http.server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def pipeline_pass(location, preprocess, args) -> float:
    """Seconds to read, hash and decode every image (the fast CPU decode path), no model."""
    pipeline = eval_pipeline(preprocess, "cpu", "jpg", "fast")
    loader = make_loader(location, None, args.batch_size, num_workers=args.workers, with_index=True,
                         **pipeline.loader_kwargs)
    seconds, _ = common.timed(lambda: sum(len(b[1]) for b in loader))
    return seconds


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], images=2048, quick_images=128)
    p.add_argument("--rounds", type=int, default=3, help="alternating local/streamed rounds (median counts)")
    args = p.parse_args()
    work = common.setup(args)
    _, shards = common.benchmark_images(args, work, workers=args.workers)
    clip = common.load_model(args.model)
    model = Classifier.zeroshot(clip, [f"class{i:03d}" for i in range(10)], ["a photo of a {}."]).eval()
    options = EvalOptions(batch_size=args.batch_size, workers=args.workers, progress=False)
    times: dict[str, list[float]] = {k: [] for k in ("pipe-local", "pipe-stream", "eval-local", "eval-stream")}
    with http_server(shards) as url:
        evaluate({"m": model}, shards, clip.preprocess_eval, options)  # warm-up; remembers the local hashes
        for r in range(args.rounds):
            order = [("local", shards), ("stream", url)] if r % 2 == 0 else [("stream", url), ("local", shards)]
            for side, location in order:
                times[f"pipe-{side}"].append(pipeline_pass(location, clip.preprocess_eval, args))
            for side, location in order:
                seconds, _ = common.timed(lambda: evaluate({"m": model}, location, clip.preprocess_eval, options))
                times[f"eval-{side}"].append(seconds)
    ips = {k: args.images / statistics.median(v) for k, v in times.items()}
    print(f"== {args.images} JPEGs {args.image_size} in {len(list(shards.glob('*.tar')))} shards, batch "
          f"{args.batch_size}, {args.workers} workers, {args.rounds} rounds (median); {common.conditions()}")
    # the ratio that counts is the median of each round's pair (local and streamed run back to back), which
    # a machine whose load drifts between rounds disturbs less than a ratio of the two medians
    paired = {key: statistics.median(lo / st for lo, st in zip(times[f"{key}-local"], times[f"{key}-stream"]))
              for key in ("pipe", "eval")}
    rows = [{"pass": name, "local img/s": f"{ips[f'{key}-local']:.1f}", "streamed img/s": f"{ips[f'{key}-stream']:.1f}",
             "streamed / local (median of rounds)": common.verdict(paired[key], 0.9, True)}
            for key, name in (("pipe", "read + hash + decode (no model)"), ("eval", f"evaluate ({args.model})"))]
    print(common.table(rows, list(rows[0])))
    print("per round (s): " + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)}" for k, v in times.items()))


if __name__ == "__main__":
    main()
