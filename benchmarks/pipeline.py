"""Images/s of the harness's evaluation input pipeline vs the anchors' (issue 7, target >= 1.5x on CPU).

Reference: torchvision ``ImageFolder`` + PIL + open_clip's eval preprocess + ``DataLoader``.
Ours: shard sets read by ``make_loader`` with the decode path ``evaluate`` picks on CPU (the fast
decoder in the workers, batch normalisation in the main process), on
(a) shards made with the converter's resize option (``shard imagefolder --resize-shorter 224``),
(b) full-size shards (the files' own bytes), and (b') full-size with reduced-size JPEG decoding
(``draft_factor=1``; it only acts on JPEGs whose shorter side is at least twice the resize
target, so at 500x375 it does nothing and its row measures the noise; see --image-size 1000x750).
Same images, same worker count, configurations interleaved and repeated; the median counts.
Then the same with the model's forward pass (``evaluate`` vs a plain loop over the reference
loader), and the pixel differences of each path from the reference preprocess.

    python benchmarks/pipeline.py --quick          # ~30 s
    python benchmarks/pipeline.py                  # default sizes, a few minutes on 2 cores
    python benchmarks/pipeline.py --image-size 1000x750 --images 256   # large photos: draft decoding
"""
from __future__ import annotations

import statistics
from pathlib import Path

import _common as common
import numpy as np
import torch

from robustbench_ft.evaluation.dataset_pass import evaluate
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.evaluation.pipeline import eval_pipeline
from robustbench_ft.loading.eval_decode import CPUDecoder, parse_eval_transform
from robustbench_ft.loading.loader import make_loader
from robustbench_ft.loading.shard_dataset import decode_image
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.shards.manifest import Manifest
from robustbench_ft.shards.reader import read_shard


def shard_loader_images_per_s(directory: Path, preprocess, args, decode: str, draft: float | None) -> float:
    """Read, decode and normalise every image of a shard set as ``evaluate`` does (no model)."""
    manifest = Manifest.load(directory)
    pipeline = eval_pipeline(preprocess, "cpu", manifest.image_format, decode, draft_factor=draft)
    kwargs = dict(pipeline.loader_kwargs)
    loader = make_loader(directory, kwargs.pop("transform", None), args.batch_size, num_workers=args.workers,
                         with_index=True, **kwargs)
    seconds, count = common.timed(lambda: sum(len(pipeline.prepare(b[0], b[2])) for b in loader))
    assert count == manifest.num_samples
    return count / seconds


def reference_images_per_s(imagefolder: Path, preprocess, args) -> float:
    loader = common.reference_loader(imagefolder, preprocess, args.batch_size, args.workers)
    seconds, count = common.timed(lambda: sum(len(images) for images, _ in loader))
    return count / seconds


def pixel_differences(directory: Path, preprocess, decode_from: Path, draft: float | None, limit: int = 32) -> str:
    """Max / mean |ours - reference| in grey levels over the first ``limit`` images (reference on the originals)."""
    manifest = Manifest.load(directory)
    spec = parse_eval_transform(preprocess).with_draft(draft)
    decoder = CPUDecoder(spec)  # uint8 output: differences in grey levels
    originals = sorted(decode_from.rglob("*.jpg"))[:limit]
    shard = directory / manifest.shards[0].name
    diffs = []
    for original, sample in zip(originals, read_shard(shard, len(manifest.classes))):
        ours = decoder(sample.image_bytes, shard, sample.key).float()
        ref = preprocess(decode_image(original.read_bytes(), original, original.name))
        ref = (ref * torch.tensor(spec.std).view(3, 1, 1) + torch.tensor(spec.mean).view(3, 1, 1)) * 255
        diffs.append((ours - ref).abs())
    d = torch.stack(diffs)
    return f"max {d.max():.1f}, mean {d.mean():.3f} grey levels"


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], images=1024, quick_images=96)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per configuration (median)")
    p.add_argument("--model-images", type=int, default=None, help="images for the with-model part (default images/2)")
    args = p.parse_args()
    work = common.setup(args)
    if args.quick:
        args.repeats = 1
    clip = common.load_model(args.model)
    preprocess = clip.preprocess_eval
    size = args.image_size
    folder = common.make_imagefolder(work / f"folder-{size}-{args.images}", args.images, size)
    full = common.make_shards(folder, work / f"shards-full-{size}-{args.images}")
    resized = common.make_shards(folder, work / f"shards-224-{size}-{args.images}", resize_shorter=224)

    configs = {
        "reference (ImageFolder+PIL+open_clip preprocess)": lambda: reference_images_per_s(folder, preprocess, args),
        "ours, shards --resize-shorter 224": lambda: shard_loader_images_per_s(resized, preprocess, args, "fast", None),
        "ours, full-size shards": lambda: shard_loader_images_per_s(full, preprocess, args, "fast", None),
        "ours, full-size shards, draft decode": lambda: shard_loader_images_per_s(full, preprocess, args, "fast", 1.0),
        "(our shards, reference PIL decode)": lambda: shard_loader_images_per_s(full, preprocess, args, "reference",
                                                                                None),
    }
    results: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, fn in configs.items():
            results[name].append(fn())
    ref = statistics.median(results[next(iter(configs))])
    rows = [{"pipeline": name, "images/s": f"{statistics.median(v):.0f}",
             "runs": " ".join(f"{x:.0f}" for x in v), "vs reference": f"{statistics.median(v) / ref:.2f}x"}
            for name, v in results.items()]
    print(f"\n== input pipeline, {args.images} JPEGs {size}, {args.workers} workers, batch {args.batch_size} "
          f"({common.conditions()})")
    print(common.table(rows, ["pipeline", "images/s", "vs reference", "runs"]))
    speed = {name: statistics.median(v) / ref for name, v in results.items()}
    print("(a) resized shards:    " + common.verdict(speed["ours, shards --resize-shorter 224"], 1.5, True))
    print("(b) full-size shards:  " + common.verdict(speed["ours, full-size shards"], 1.5, True))
    print("(b') full-size, draft: " + common.verdict(speed["ours, full-size shards, draft decode"], 1.5, True))
    print("pixels vs the reference preprocess on the original files:")
    print(f"  full-size shards:          {pixel_differences(full, preprocess, folder, None)}")
    print(f"  full-size, draft decode:   {pixel_differences(full, preprocess, folder, 1.0)}")
    print(f"  resized shards (re-encoded by the converter): {pixel_differences(resized, preprocess, folder, None)}")

    # with the model: what an evaluation pass of one classifier costs end to end
    n_model = args.model_images or max(args.images // 2, 32)
    mfolder = common.make_imagefolder(work / f"folder-{size}-{n_model}-m", n_model, size, seed=1)
    mshards = common.make_shards(mfolder, work / f"shards-full-{size}-{n_model}-m")
    model = Classifier.zeroshot(clip, [f"class{i:03d}" for i in range(10)], ["a photo of a {}."])

    @torch.no_grad()
    def reference_eval() -> np.ndarray:
        return np.concatenate([model(images).numpy() for images, _ in
                               common.reference_loader(mfolder, preprocess, args.batch_size, args.workers)])

    ref_s, ref_logits = common.timed(reference_eval)
    ours_s, preds = common.timed(lambda: evaluate({"m": model}, mshards, preprocess, EvalOptions(batch_size=args.batch_size, workers=args.workers, progress=False, verify="size")))
    agree = float((preds.logits["m"].argmax(1) == ref_logits.argmax(1)).mean())
    print(f"\n== with the {args.model} forward pass ({n_model} images): reference {n_model / ref_s:.1f} img/s, "
          f"ours {n_model / ours_s:.1f} img/s: {n_model / ours_s / (n_model / ref_s):.2f}x; top-1 agreement with the "
          f"reference {agree:.1%}, max |logit diff| {np.abs(preds.logits['m'] - ref_logits).max():.4f}")


if __name__ == "__main__":
    main()
