"""Linear-classifier sweep: 11 α of a linear-probe WiSE-FT from cached features vs one full evaluation
(issue 7, target <= 0.05x).

With a frozen encoder every α is a linear head on the same features, and ``evaluate`` keeps the
features of every encoder it runs in the feature cache (keyed by encoder hash, manifest hash and
transform id). The first evaluation (zero-shot classifier, cold caches: decode + forward) fills it;
the 11 heads of the sweep are then scored from the cached features, with no image decoded and no
forward pass (their logits are new: the logits cache is cold for them).

    python benchmarks/linear_sweep.py --quick
    python benchmarks/linear_sweep.py
"""
from __future__ import annotations

import shutil

import _common as common
import numpy as np
import torch

from robustbench_ft.evaluation.cache import ArrayCache
from robustbench_ft.evaluation.dataset_pass import evaluate, evaluate_cached
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.models.classifier import Classifier, interpolate


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], images=256, quick_images=32).parse_args()
    work = common.setup(args)
    clip = common.load_model(args.model)
    _, shards = common.benchmark_images(args, work)
    zeroshot = Classifier.zeroshot(clip, [f"class{i:03d}" for i in range(10)], ["a photo of a {}."])
    probe = Classifier(zeroshot.visual, torch.randn_like(zeroshot.head.weight), zeroshot.info)  # a linear probe
    sweep = {f"α={a:.1f}": interpolate(zeroshot, probe, float(a)) for a in np.linspace(0, 1, 11)}
    assert all(c.visual is zeroshot.visual for c in sweep.values())

    cache_dir = work / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    logits, features = ArrayCache(cache_dir / "logits"), ArrayCache(cache_dir / "features")
    opts = EvalOptions(batch_size=args.batch_size, workers=args.workers, progress=False, verify="size")
    full_s, full = common.timed(lambda: evaluate_cached({"zero-shot": zeroshot}, shards, clip.preprocess_eval,
                                                        logits, opts, features=features))
    sweep_s, swept = common.timed(lambda: evaluate_cached(sweep, shards, clip.preprocess_eval, logits, opts,
                                                          features=features))
    assert full.forward_passes == 1 and swept.forward_passes == 0
    direct = evaluate({"α=0.5": sweep["α=0.5"]}, shards, clip.preprocess_eval, opts)  # check: same logits
    err = float(np.abs(direct.logits["α=0.5"] - swept.logits["α=0.5"]).max())
    print(f"\n== linear-probe WiSE-FT sweep, 11 heads, {len(full.labels)} JPEGs {args.image_size}, {args.model} "
          f"({common.conditions()})")
    print(common.table([
        {"step": "one full evaluation (decode + forward, fills the feature cache)", "seconds": f"{full_s:.2f}"},
        {"step": "11 α heads from cached features (no decode, no forward)", "seconds": f"{sweep_s:.3f}"},
    ], ["step", "seconds"]))
    print(f"max |logit difference| from a full evaluation of α=0.5: {err:.2e}")
    print("sweep / one full evaluation: " + common.verdict(sweep_s / full_s, 0.05, False))


if __name__ == "__main__":
    main()
