"""What issue 15's methods cost, each measured side by side with its base in one run.

1. **VRF evaluation** as a ratio to a WiSE-FT evaluation (target <= 2.3x): the real evaluation pass
   (:func:`robustbench_ft.evaluation.dataset_pass.evaluate`) over the demo suite's MNIST test split,
   once for a WiSE-FT α=0.5 candidate (one encoder) and once for a VRF candidate (both encoders, the
   probability mixture and the exact kNN against a failure set of ``--failure-set`` rows), alternated
   ``--rounds`` times; the median of each. The kNN alone is also timed per image.
2. **Training cost per step** of m2-mix and CaRot as ratios to FLYP (target m2-mix <= 1.05x) and of
   fsr as a ratio to finetune: each method's objective and optimiser step on the same fixed batch
   (``--batch-size`` demo images), round robin over ``--rounds`` rounds after a warm-up, median
   seconds per step. Data loading is left out (it is the same for every method and would pull every
   ratio towards 1); the demo model with its bundled weights, on this machine's CPU threads.
3. Optionally (``--imagenet-v N``) the kNN time per image against N×512 random unit vectors next to
   one CLIP ViT-B/16 image-encoder forward (random weights, 224 px): the two costs behind VRF's
   ratio at ImageNet scale, measured here, not extrapolated.

Ratios are of the process's **CPU time** (``time.process_time``; one torch thread and in-process
loading by default, so that all the work is this process's): on a machine shared with other jobs,
wall time swings by several times from one step to the next, CPU time much less. Each ratio is the
median over rounds of the ratio within a round (the two sides run back to back, so a slow spell of
the machine cancels out); wall-clock ratios are recorded beside them. The m²-term is also timed
alone (forward and backward on the batch's features), the part of m2-mix that FLYP does not have.

    python benchmarks/method_cost.py --quick
    python benchmarks/method_cost.py --json results.json [--imagenet-v 200000]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from robustbench_ft.datasets.build import ensure_dataset
from robustbench_ft.datasets.registry import get_dataset, get_suite
from robustbench_ft.evaluation.dataset_pass import evaluate
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.loading.training_batches import TrainingBatches
from robustbench_ft.methods.carot import CarotLoss, CarotOptions, StudentTeacher
from robustbench_ft.methods.flyp import CaptionedContrastiveLoss
from robustbench_ft.methods.fsr import FsrOptions, fsr_loss
from robustbench_ft.methods.m2_mix import GeodesicMixupLoss, M2MixOptions, m2_loss
from robustbench_ft.methods.training import ADAMW, Batch, OptimConfig, Step, cross_entropy, mean_loss
from robustbench_ft.methods.vrf import FailureSetWeights, kth_neighbour_distance
from robustbench_ft.models import load_clip
from robustbench_ft.models.classifier import Classifier, interpolate
from robustbench_ft.models.combined import MemberLogits, ProbabilityMixture
from robustbench_ft.shards.manifest import Manifest

CPU = torch.device("cpu")


def perturbed(classifier: Classifier, seed: int = 1) -> Classifier:
    """A 'fine-tuned' copy: every weight moved a little (the cost does not depend on the values)."""
    out = copy.deepcopy(classifier)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.01 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=gen))
    return out


def unit_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def evaluation_cost(clip, data_root: Path, args: argparse.Namespace) -> dict:
    """Median seconds of a WiSE-FT and a VRF evaluation pass over MNIST test, and their ratio."""
    mnist = get_dataset("mnist")
    directory = ensure_dataset(mnist, data_root, "test")
    zs = Classifier.zeroshot(clip, mnist.classnames, mnist.templates)
    ft = perturbed(zs)
    wise = interpolate(zs, ft, 0.5)
    bank = unit_rows(args.failure_set, zs.head.in_features)
    k = max(1, round(1000 * args.failure_set / 50_000))  # the code's rule for the demo's 50k training images
    vrf = ProbabilityMixture(MemberLogits([zs, ft]), (1.0, 1.0), FailureSetWeights(bank, k, 1.5, 0.6))
    options = EvalOptions(batch_size=args.eval_batch_size, workers=args.workers, progress=False)
    timer = Timer()
    for _ in range(args.eval_rounds):
        for name, model in (("wise-ft", wise), ("vrf", vrf)):
            with timer(name):
                evaluate({name: model}, directory, clip.preprocess_eval, options)
    n = Manifest.load(directory).num_samples
    queries = unit_rows(args.eval_batch_size, zs.head.in_features, seed=2)
    knn = _median_seconds(lambda: kth_neighbour_distance(queries, bank, k), 10) / len(queries)
    cpu, wall = timer.medians()
    return {"images": n, "failure_set": args.failure_set, "k": k, "feature_dim": zs.head.in_features,
            "cpu_s": cpu, "wall_s": wall, "ratio": timer.paired_ratio("vrf", "wise-ft"),
            "wall_ratio": timer.paired_ratio("vrf", "wise-ft", wall=True), "knn_cpu_s_per_image": knn,
            "samples": timer.samples}


class Timer:
    """CPU and wall seconds of named blocks, every sample kept."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, float]]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cpu, wall = time.process_time(), time.perf_counter()
        yield
        self.samples.setdefault(name, []).append((time.process_time() - cpu, time.perf_counter() - wall))

    def medians(self) -> tuple[dict[str, float], dict[str, float]]:
        return ({n: statistics.median(c for c, _ in s) for n, s in self.samples.items()},
                {n: statistics.median(w for _, w in s) for n, s in self.samples.items()})

    def paired_ratio(self, a: str, b: str, wall: bool = False) -> float:
        """Median over rounds of a's time over b's in the same round."""
        i = 1 if wall else 0
        return statistics.median(x[i] / y[i] for x, y in zip(self.samples[a], self.samples[b]))


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU seconds of ``fn`` after one warm-up call."""
    fn()
    timer = Timer()
    for _ in range(repeats):
        with timer("fn"):
            fn()
    return timer.medians()[0]["fn"]


def demo_batch(clip, data_root: Path, batch_size: int) -> Batch:
    """One training batch of the demo suite (train transform), as training sees it."""
    suite = get_suite("demo")
    directory = ensure_dataset(get_dataset(suite.train[0]), data_root, suite.train[1])
    data = TrainingBatches(directory, clip.preprocess_train, batch_size, seed=0, workers=0)
    return Batch(*next(iter(data.epoch(0))))


def training_cost(clip, data_root: Path, args: argparse.Namespace) -> dict:
    """Median seconds per optimisation step (objective + AdamW step) of each method on one fixed batch."""
    mnist = get_dataset("mnist")
    names, templates = list(mnist.classnames), list(mnist.templates)
    batch = demo_batch(clip, data_root, args.batch_size)
    zs = Classifier.zeroshot(clip, names, templates)
    carot_opts = CarotOptions(ema_every=4)  # the demo suite's default
    methods = {  # name -> (fresh model, objective)
        "finetune": (lambda: copy.deepcopy(zs), mean_loss(cross_entropy())),
        "fsr": (lambda: copy.deepcopy(zs), mean_loss(fsr_loss(zs, FsrOptions()))),
        "flyp": (lambda: copy.deepcopy(clip.model), CaptionedContrastiveLoss(clip.tokenizer, names, templates)),
        "m2-mix": (lambda: copy.deepcopy(clip.model),
                   GeodesicMixupLoss(clip.tokenizer, names, templates, M2MixOptions())),
        "carot": (lambda: StudentTeacher(copy.deepcopy(clip.model)),
                  CarotLoss(clip.tokenizer, names, templates, carot_opts)),
    }
    cfg = OptimConfig(lr=1e-5, weight_decay=0.1, warmup_steps=0, grad_clip=0.0, total_steps=10**6)
    state = {}
    for name, (make, objective) in methods.items():
        model = make().train()
        state[name] = (model, ADAMW.build([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg),
                       objective, [0])
    timer, warm = Timer(), Timer()
    for round_ in range(args.warmup + args.rounds):
        for name, (model, optimizer, objective, counter) in state.items():
            step = Step(model, 1, CPU, "fp32", index=counter[0] + 1, seed=0, batches_per_epoch=195,
                        total_steps=195)
            with (timer if round_ >= args.warmup else warm)(name):
                optimizer.zero_grad(set_to_none=True)
                objective(step, batch)
                optimizer.step()
            counter[0] += 1
    cpu, wall = timer.medians()
    pairs = {"m2-mix / flyp": ("m2-mix", "flyp"), "carot / flyp": ("carot", "flyp"), "fsr / finetune": ("fsr", "finetune")}
    features = [F.normalize(torch.randn(args.batch_size, clip.model.visual.output_dim), dim=1).requires_grad_()
                for _ in range(2)]
    m2_term = _median_seconds(lambda: m2_loss(*features, 0.5, 1 / 0.07).backward(), 20)
    return {"batch_size": args.batch_size, "cpu_s_per_step": cpu, "wall_s_per_step": wall,
            "ratios": {k: timer.paired_ratio(a, b) for k, (a, b) in pairs.items()},
            "wall_ratios": {k: timer.paired_ratio(a, b, wall=True) for k, (a, b) in pairs.items()},
            "m2_term_cpu_s": m2_term, "m2_term_share_of_flyp_step": m2_term / cpu["flyp"], "samples": timer.samples}


def imagenet_scale(v: int, args: argparse.Namespace) -> dict:
    """kNN seconds per image against v×512 unit vectors, next to a ViT-B/16 image-encoder forward."""
    bank = unit_rows(v, 512)
    queries = unit_rows(64, 512, seed=3)
    k = max(1, round(1000 * v / 1_281_167))  # the code's rule on ImageNet's training set
    knn = _median_seconds(lambda: kth_neighbour_distance(queries, bank, k), 3) / len(queries)
    vit = load_clip("ViT-B-16", "random").model.visual.eval()
    images = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        encoder = _median_seconds(lambda: vit(images), 3) / len(images)
    return {"failure_set": v, "k": k, "bank_bytes": v * 512 * 4, "knn_cpu_s_per_image": knn,
            "vit_b16_encoder_cpu_s_per_image": encoder,
            "predicted_vrf_over_wise_ft": (2 * encoder + knn) / encoder}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="datasets", help="where the demo suite's shards are (built if missing)")
    p.add_argument("--failure-set", type=int, default=10_000, help="rows of VRF's failure set (default 10,000)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256, help="training batch (the demo suite's, 256)")
    p.add_argument("--rounds", type=int, default=15, help="training rounds (each: one step of every method)")
    p.add_argument("--eval-rounds", type=int, default=5, help="evaluation rounds (each: one pass of each side)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the docstring)")
    p.add_argument("--imagenet-v", type=int, default=0, help="also time kNN at this |V| with D=512 (0: skip)")
    p.add_argument("--quick", action="store_true", help="a small run to check the script works")
    p.add_argument("--json", type=Path, help="write the measurements here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.eval_rounds, args.warmup, args.batch_size, args.failure_set = 1, 1, 1, 32, 1000
    clip = load_clip("rbft-demo-vit", "rbft-demo")
    out = {"threads": args.threads, "evaluation": evaluation_cost(clip, Path(args.data_root), args),
           "training": training_cost(clip, Path(args.data_root), args)}
    if args.imagenet_v:
        out["imagenet_scale"] = imagenet_scale(args.imagenet_v, args)
    e, t = out["evaluation"], out["training"]
    print(f"VRF evaluation / WiSE-FT evaluation: {e['ratio']:.2f}x CPU time (target <= 2.3x; {e['cpu_s']['vrf']:.1f} s "
          f"vs {e['cpu_s']['wise-ft']:.1f} s on {e['images']} images, |V|={e['failure_set']}, k={e['k']}; wall "
          f"{e['wall_ratio']:.2f}x; kNN {1e6 * e['knn_cpu_s_per_image']:.1f} us/image)")
    for name, ratio in t["ratios"].items():
        print(f"training step {name}: {ratio:.2f}x CPU time (wall {t['wall_ratios'][name]:.2f}x)"
              + (" (target <= 1.05x)" if name.startswith("m2") else ""))
    print("CPU seconds per step:", {k: round(v, 4) for k, v in t["cpu_s_per_step"].items()},
          f"; the m² term alone {1e3 * t['m2_term_cpu_s']:.1f} ms ({100 * t['m2_term_share_of_flyp_step']:.1f} % of a FLYP step)")
    if args.imagenet_v:
        s = out["imagenet_scale"]
        print(f"ImageNet scale: |V|={s['failure_set']} x 512 fp32 = {s['bank_bytes'] / 2**30:.2f} GiB; kNN "
              f"{1e3 * s['knn_cpu_s_per_image']:.2f} ms/image vs ViT-B/16 encoder {1e3 * s['vit_b16_encoder_cpu_s_per_image']:.1f}"
              f" ms/image: VRF/WiSE-FT about {s['predicted_vrf_over_wise_ft']:.2f}x (forward passes only)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
