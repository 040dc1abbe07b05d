"""Cost of a perturbation shift per image, as a ratio to a clean forward pass, side by side in one run (issue 18).

A zero-shot classifier of ``--model``/``--pretrained`` scores ``--images`` random images at the model's input
size, labelled with its own predictions, so every image is attacked (clean accuracy 100 %: the worst case;
AutoAttack skips images already misclassified). For each perturbation the time per image is divided by the time
per image of a clean forward pass (the median of ``--repeats`` clean passes, measured between the perturbations so
that machine load hits both alike). AutoAttack's cost depends on how robust the model is: Square runs its 5,000
queries only on the images the gradient attacks did not break, so a model that resists costs far more.

    python benchmarks/attack_cost.py [--model rbft-tiny-vit --pretrained random --images 16 \\
        --perturbations linf-4/255,l2-2.0,l1-75,corruptions-s3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from robustbench_ft.models import load_clip
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.perturbations.attack import PixelSpaceModel, autoattack
from robustbench_ft.perturbations.corruptions import corrupt_portfolio
from robustbench_ft.perturbations.evaluate import split_normalize
from robustbench_ft.perturbations.spec import parse_perturbations


def clean_seconds(model: PixelSpaceModel, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="rbft-tiny-vit")
    parser.add_argument("--pretrained", default="random")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--perturbations", default="linf-4/255,l2-2.0,l1-75,corruptions-s3")
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = load_clip(args.model, args.pretrained)
    names = [f"class {i}" for i in range(args.classes)]
    classifier = Classifier.zeroshot(clip, names, ["a photo of a {}."]).eval()
    _, mean, std = split_normalize(clip.preprocess_eval)
    model = PixelSpaceModel(classifier, mean, std)
    size = classifier.visual.image_size if hasattr(classifier.visual, "image_size") else 224
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.rand(args.images, 3, size, size, generator=torch.Generator().manual_seed(0)).to(clip.device)
    with torch.no_grad():
        y = model(x).argmax(1)
    clean_seconds(model, x)  # warm-up
    print(f"{args.model} ({args.pretrained}), {args.images} images of {size}x{size}, {args.classes} classes, "
          f"{torch.get_num_threads()} threads, device {clip.device}")
    print(f"{'perturbation':16s} {'s/image':>10s} {'clean s/image':>14s} {'ratio':>10s} {'robust acc':>10s}")
    for p in parse_perturbations(args.perturbations.split(",")):
        clean = statistics.median(clean_seconds(model, x) for _ in range(args.repeats)) / len(x)
        start = time.perf_counter()
        if p.kind == "autoattack":
            x_p = autoattack(model, x, y, p.norm, p.eps, seed=0, num_classes=args.classes, batch_size=len(x))
        else:
            x_p = torch.from_numpy(corrupt_portfolio(x.cpu().numpy(), np.arange(len(x)), p.severity, 0)).to(x.device)
        with torch.no_grad():
            acc = float((model(x_p).argmax(1) == y).float().mean())
        per_image = (time.perf_counter() - start) / len(x)
        print(f"{p.name:16s} {per_image:10.4f} {clean:14.6f} {per_image / clean:9.0f}x {100 * acc:9.1f}%")


if __name__ == "__main__":
    main()
