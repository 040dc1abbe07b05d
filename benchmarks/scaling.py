"""Time and peak memory of an evaluation pass at 1x, 2x and 4x the images (issue 7: time linear, memory flat).

Each size runs in its own process (so peaks do not mix): 11 classifiers (linear heads on one
encoder, 1000 outputs each, as an ImageNet α sweep) evaluated through ``evaluate_cached`` into a
fresh cache, where logits stream to ``.npy`` files and come back memory-mapped; and, for
comparison, plain ``evaluate`` holding all logits in RAM. Peak *anonymous* resident memory of the
main process is sampled (memory-mapped cache files are reclaimable page cache, reported apart as
the kernel's VmHWM). Finally the float16 question: how many argmaxes flip if logits were stored as
float16 (why they are kept float32).

    python benchmarks/scaling.py --quick
    python benchmarks/scaling.py
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import _common as common
import numpy as np
import torch

from robustbench_ft.evaluation.options import EvalOptions

CLASSES = 1000
HEADS = 11


def one_size(args, n: int, mode: str) -> dict:
    """In a child process: evaluate the ``n``-image set in ``mode`` ("streamed" or "in-memory")."""
    from robustbench_ft.evaluation.cache import ArrayCache
    from robustbench_ft.evaluation.dataset_pass import evaluate, evaluate_cached
    from robustbench_ft.models.classifier import Classifier

    work = Path(args.workdir)
    shards = work / f"shards-full-{args.image_size}-{n}"
    clip = common.load_model(args.model)
    zeroshot = Classifier.zeroshot(clip, ["a", "b"], ["{}"])
    generator = torch.Generator().manual_seed(0)
    heads = {f"head{i}": Classifier(zeroshot.visual, torch.randn(CLASSES, zeroshot.head.in_features,
                                                                  generator=generator), zeroshot.info)
             for i in range(HEADS)}
    opts = EvalOptions(batch_size=args.batch_size, workers=args.workers, progress=False, verify="size")
    cache = work / f"cache-{n}-{mode}"
    shutil.rmtree(cache, ignore_errors=True)
    with common.peak_memory() as mem:
        if mode == "streamed":
            seconds, preds = common.timed(lambda: evaluate_cached(heads, shards, clip.preprocess_eval,
                                                                  ArrayCache(cache / "logits"), opts,
                                                                  num_outputs=CLASSES))
        else:
            seconds, preds = common.timed(lambda: evaluate(heads, shards, clip.preprocess_eval, opts,
                                                           num_outputs=CLASSES))
        top1 = {k: preds.top1(k) for k in heads}
    flips = sum(int((preds.logits[k].astype(np.float16).argmax(1) != preds.logits[k].argmax(1)).sum()) for k in heads)
    shutil.rmtree(cache, ignore_errors=True)
    return {"n": n, "mode": mode, "seconds": seconds, "peak_anon_mib": mem["peak_anon_mib"],
            "start_anon_mib": mem["start_anon_mib"], "hwm_mib": mem["hwm_mib"], "top1": top1,
            "fp16_argmax_flips": flips, "rows": n * HEADS}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], images=128, quick_images=16)
    p.add_argument("--child", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        common.setup(args)
        print(json.dumps(one_size(args, int(args.child[0]), args.child[1])))
        return
    work = common.setup(args)
    args.workdir = str(work)
    base = args.images
    for n in (base, 2 * base, 4 * base):
        folder = common.make_imagefolder(work / f"folder-{args.image_size}-{n}", n, args.image_size)
        common.make_shards(folder, work / f"shards-full-{args.image_size}-{n}")
    results = []
    for n in (base, 2 * base, 4 * base):
        for mode in ("streamed", "in-memory"):
            cmd = [sys.executable, __file__, "--child", str(n), mode, "--workdir", str(work), "--model", args.model,
                   "--image-size", args.image_size, "--workers", str(args.workers), "--batch-size",
                   str(args.batch_size), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
    first = {r["mode"]: r for r in results if r["n"] == base}
    rows = [{"images": r["n"], "logits": r["mode"], "seconds": f"{r['seconds']:.1f}",
             "s/img vs 1x": f"{(r['seconds'] / r['n']) / (first[r['mode']]['seconds'] / base):.2f}",
             "peak anon MiB (+ over start)": f"{r['peak_anon_mib']:.0f} (+{r['peak_anon_mib'] - r['start_anon_mib']:.0f})",
             "VmHWM MiB": f"{r['hwm_mib']:.0f}"} for r in results]
    print(f"\n== scaling, {HEADS} heads x {CLASSES} classes, JPEGs {args.image_size}, {args.model} "
          f"({common.conditions()})")
    print(common.table(rows, ["images", "logits", "seconds", "s/img vs 1x", "peak anon MiB (+ over start)",
                              "VmHWM MiB"]))
    same = all(a["top1"] == b["top1"] for a, b in zip(results[::2], results[1::2]))
    print(f"metrics identical streamed vs in-memory: {same}")
    flips = sum(r["fp16_argmax_flips"] for r in results if r["mode"] == "streamed")
    total = sum(r["rows"] for r in results if r["mode"] == "streamed")
    print(f"float16 storage would flip {flips} of {total} argmaxes ({flips / total:.2%}): logits are kept float32")


if __name__ == "__main__":
    main()
