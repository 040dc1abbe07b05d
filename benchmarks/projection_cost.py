"""Cost of the projection family against finetune's AdamW, side by side in one run (issue 14).

For each optimizer (``finetune``'s AdamW, ``ftp``, ``spd``, ``digrap``, and TPGM's per-step mode) the same
zero-shot classifier is trained on the same fixed batches, each with its method's own defaults (FTP does
not clip gradients, the others clip at 1.0). Rounds interleave the optimizers (A B C D A B C D ...) so
that a change in machine load hits all of them alike; the median over rounds is reported:

* time per optimisation step (forward, backward, clipping, optimizer step) and of the optimizer step
  alone, and their ratios to AdamW's (the step ratio is the median of per-round ratios); beside the measured step ratio, the ratio the optimizer times
  imply, 1 + (t_opt − t_opt,AdamW)/t_step,AdamW (forward and backward are the same computation for
  all: on a loaded machine the measured full-step ratio carries the load's noise, the implied one not);
* memory: the optimizer's own state (moments, radii, previous displacements; the anchors are the
  zero-shot classifier's tensors, not copies) plus parameters and gradients, as a ratio to AdamW's;
  on a GPU also the peak allocated memory of a step.

TPGM's post-hoc projection stage (``--tpgm-iterations`` radius updates on batches of 64, the suite default
of the demo: 30) is timed against a whole demo fine-tuning run (``--ft-steps`` = 195 steps of 256, one
epoch of the 50k MNIST training images, at the measured AdamW step time). Targets: FTP, SPD, DiGraP
<= 1.15x a finetune step; TPGM's projection stage <= 5 % of the fine-tuning run.

    python benchmarks/projection_cost.py [--model rbft-demo-vit --pretrained rbft-demo --batch-size 256]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from robustbench_ft.demo.digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES
from robustbench_ft.methods.digrap import DiGraPOptions, digrap_optimizer
from robustbench_ft.methods.ftp import FTPOptions, ftp_optimizer
from robustbench_ft.methods.spd import SPDOptions, spd_optimizer
from robustbench_ft.methods.tpgm import Projection, train_radii
from robustbench_ft.methods.training import ADAMW, OptimConfig
from robustbench_ft.models import load_clip
from robustbench_ft.models.classifier import Classifier


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


class Run:
    """One optimizer training its own copy of the zero-shot classifier."""

    def __init__(self, name, factory, start: Classifier, cfg: OptimConfig, grad_clip: float):
        self.name, self.grad_clip = name, grad_clip
        self.model = copy.deepcopy(start).train()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.params = [p for p in self.model.parameters()]
        self.optimizer = factory.build(list(self.model.named_parameters()), cfg)
        self.step_s: list[float] = []
        self.opt_s: list[float] = []
        self.peak_mib = 0.0

    def steps(self, batches, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        total = opt = 0.0
        for images, labels in batches:
            _sync(device)
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(self.model(images), labels).backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            _sync(device)
            t1 = time.perf_counter()
            self.optimizer.step()
            _sync(device)
            t2 = time.perf_counter()
            total, opt = total + t2 - t0, opt + t2 - t1
        self.step_s.append(total / len(batches))
        self.opt_s.append(opt / len(batches))
        if device.type == "cuda":
            self.peak_mib = max(self.peak_mib, torch.cuda.max_memory_allocated(device) / 2**20)

    def memory_bytes(self) -> int:
        params = sum(p.numel() * p.element_size() for p in self.params)
        return 2 * params + _state_bytes(self.optimizer)  # parameters, gradients, optimizer state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="rbft-demo-vit")
    p.add_argument("--pretrained", default="rbft-demo")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256, help="training batch (the demo recipe: 256)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per optimizer per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no thread-pool stalls on a shared machine)")
    p.add_argument("--tpgm-iterations", type=int, default=30, help="post-hoc radius updates (demo default 30)")
    p.add_argument("--ft-steps", type=int, default=195, help="steps of the fine-tuning run TPGM is compared to")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clip = load_clip(args.model, args.pretrained, device)
    start = Classifier.zeroshot(clip, DIGIT_CLASSNAMES, DIGIT_TEMPLATES)
    size = clip.model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, *size, generator=gen).to(device),
                torch.randint(0, len(DIGIT_CLASSNAMES), (args.batch_size,), generator=gen).to(device))
               for _ in range(args.steps)]
    cfg = OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=0, grad_clip=1.0, total_steps=10**6)
    zero_wd = OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=0, grad_clip=0.0, total_steps=10**6)
    runs = [Run("finetune (AdamW)", ADAMW, start, cfg, 1.0),
            Run("ftp", ftp_optimizer(start, FTPOptions()), start, zero_wd, FTPOptions().grad_clip),
            Run("spd", spd_optimizer(start, SPDOptions()), start, zero_wd, SPDOptions().grad_clip),
            Run("digrap", digrap_optimizer(start, DiGraPOptions()), start, zero_wd, DiGraPOptions().grad_clip)]
    for run in runs:  # warm-up: allocator, kernels, and past each method's first (special) steps
        run.steps(batches[:2], device)
        run.step_s.clear()
        run.opt_s.clear()
    for r in range(args.rounds):  # the order alternates, so that a drift in load within a round evens out
        for run in (runs if r % 2 == 0 else runs[::-1]):
            run.steps(batches, device)
    base = runs[0]
    base_step, base_opt = statistics.median(base.step_s), statistics.median(base.opt_s)
    print(f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(f"{args.model} ({args.pretrained}) on {device}, batch {args.batch_size}, {args.rounds} rounds x "
          f"{args.steps} steps, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'optimizer':18s} {'step ms':>8s} {'ratio':>6s} {'opt ms':>7s} {'implied':>7s} {'mem MiB':>8s} {'ratio':>6s}"
          + (f" {'peak MiB':>9s} {'ratio':>6s}" if device.type == "cuda" else ""))
    for run in runs:
        step, opt = statistics.median(run.step_s), statistics.median(run.opt_s)
        paired = statistics.median(a / b for a, b in zip(run.step_s, base.step_s))  # same round, same load
        mem = run.memory_bytes() / 2**20
        implied = 1 + (opt - base_opt) / base_step
        line = (f"{run.name:18s} {step * 1e3:8.1f} {paired:6.3f} {opt * 1e3:7.2f} {implied:7.3f} "
                f"{mem:8.1f} {run.memory_bytes() / base.memory_bytes():6.3f}")
        if device.type == "cuda":
            line += f" {run.peak_mib:9.1f} {run.peak_mib / base.peak_mib:6.3f}"
        verdict = "" if run is base else (f"   (target <= 1.15x: measured {'met' if paired <= 1.15 else 'NOT met'}"
                                          f", implied {'met' if implied <= 1.15 else 'NOT met'})")
        print(line + verdict)
        if run is not base:
            print(f"{'':18s} per-round step ratios: " + " ".join(f"{a / b:.3f}" for a, b in zip(run.step_s, base.step_s)))
    print(f"AdamW optimizer step alone: {base_opt * 1e3:.2f} ms")

    # TPGM post-hoc: radius training between the zero-shot model and a (here: AdamW-trained) endpoint
    finetuned = runs[0].model.eval()
    anchors = {n: q.detach() for n, q in start.named_parameters()}
    val = [(torch.randn(64, 3, *size, generator=gen).to(device),
            torch.randint(0, len(DIGIT_CLASSNAMES), (64,), generator=gen).to(device)) for _ in range(8)]
    _sync(device)
    t0 = time.perf_counter()
    projection = Projection.between(anchors, dict(finetuned.named_parameters()), "l2")
    radii = projection.initial_radii()
    moments = {n: {"radius_m": torch.zeros_like(g), "radius_v": torch.zeros_like(g)} for n, g in radii.items()}
    batches_iter = (val[k % len(val)] for k in range(args.tpgm_iterations))
    train_radii(projection, finetuned, radii, moments, batches_iter, args.tpgm_iterations, 1e-2, 1)
    _sync(device)
    tpgm_s = time.perf_counter() - t0
    ft_run = base_step * args.ft_steps
    share = tpgm_s / ft_run
    print(f"tpgm post-hoc: {args.tpgm_iterations} radius updates x 64 in {tpgm_s:.2f} s = {share:.1%} of a "
          f"{args.ft_steps}-step fine-tuning run ({ft_run:.1f} s at the AdamW step time) "
          f"(target <= 5 %: {'met' if share <= 0.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
