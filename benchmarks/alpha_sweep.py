"""WiSE-FT α sweep end to end: 11 candidates in one pass vs 11 separate passes (issue 7, target <= 0.3x).

Each α of an end-to-end WiSE-FT has its own image encoder, so both sides run 11 forward passes per
image; one pass saves the other 10 decodes. The ratio is therefore (11·F + D) / (11·(F + D)) for a
forward cost F and a decode cost D per image: it reaches 0.3 only where F <= 0.3·D, i.e. when the
network runs on a GPU and decoding on CPU cores. The script measures D and F separately and prints
that prediction next to the measured ratio. It also times the anchors' practice (11 passes of the
reference pipeline: ImageFolder + PIL + open_clip preprocess).

    python benchmarks/alpha_sweep.py --quick
    python benchmarks/alpha_sweep.py
"""
from __future__ import annotations

import copy

import _common as common
import numpy as np
import torch

from robustbench_ft.evaluation.dataset_pass import evaluate
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.models.classifier import Classifier, interpolate
from robustbench_ft.shards.manifest import Manifest

ALPHAS = [round(a, 1) for a in np.linspace(0, 1, 11)]


def wise_ft_candidates(clip) -> dict[str, Classifier]:
    """Zero-shot, a 'fine-tuned' copy (every weight perturbed) and their 11 weight-space interpolations."""
    zeroshot = Classifier.zeroshot(clip, [f"class{i:03d}" for i in range(10)], ["a photo of a {}."])
    finetuned = copy.deepcopy(zeroshot)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.01 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=generator))
    out = {f"α={a}": interpolate(zeroshot, finetuned, a) for a in ALPHAS}
    assert len({id(c.visual) for c in out.values()}) == len(ALPHAS), "each α must have its own encoder"
    return out


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], images=128, quick_images=24).parse_args()
    work = common.setup(args)
    clip = common.load_model(args.model)
    folder, shards = common.benchmark_images(args, work)
    n = Manifest.load(shards).num_samples
    candidates = wise_ft_candidates(clip)
    opts = EvalOptions(batch_size=args.batch_size, workers=args.workers, progress=False, verify="size")

    one_s, one = common.timed(lambda: evaluate(candidates, shards, clip.preprocess_eval, opts))
    sep_s, sep = common.timed(lambda: [evaluate({k: c}, shards, clip.preprocess_eval, opts)
                                       for k, c in candidates.items()])
    for k, p in zip(candidates, sep):
        np.testing.assert_allclose(one.logits[k], p.logits[k], rtol=1e-4, atol=1e-4)

    @torch.no_grad()
    def reference_passes() -> None:
        for c in candidates.values():
            for images, _ in common.reference_loader(folder, clip.preprocess_eval, args.batch_size, args.workers):
                c(images)

    ref_s, _ = common.timed(reference_passes)

    # the two costs the ratio is made of, per image: decode D (all workers) and one forward F
    d, f = common.decode_and_forward_costs(shards, clip.preprocess_eval, candidates["α=0.5"], args)
    print(f"\n== α sweep, {len(ALPHAS)} end-to-end WiSE-FT candidates, {n} JPEGs {args.image_size}, {args.model} "
          f"({common.conditions()})")
    print(common.table([
        {"how": "one pass, 11 candidates (ours)", "seconds": f"{one_s:.1f}"},
        {"how": "11 separate passes (ours)", "seconds": f"{sep_s:.1f}"},
        {"how": "11 passes of the reference pipeline", "seconds": f"{ref_s:.1f}"},
    ], ["how", "seconds"]))
    print(f"decode D = {1e3 * d:.2f} ms/img, forward F = {1e3 * f:.2f} ms/img on this machine; "
          f"predicted one/11 ratio (11F+D)/(11(F+D)) = {(11 * f + d) / (11 * (f + d)):.3f}")
    print("one pass / 11 passes (same pipeline): " + common.verdict(one_s / sep_s, 0.3, False))
    print("one pass / 11 reference passes:       " + common.verdict(one_s / ref_s, 0.3, False))


if __name__ == "__main__":
    main()
