"""GPU evaluation: images/s of decode + forward vs forward-only on pre-decoded tensors (issue 7, target >= 70%).

For ViT-B/32 and ViT-B/16 (random weights, bf16 autocast, channels-last), on synthetic ImageNet-sized
JPEG shards: (1) forward only, on batches decoded beforehand and already on the GPU; (2) a full
``evaluate`` pass with the device decode path (workers read shards and ship JPEG bytes, pinned;
nvJPEG batch decode, resize, crop and normalise on the GPU); (3) the same pass with the CPU decode
path, for comparison. Prints (2)/(1) per model. ``--compile`` adds ``torch.compile`` to (1) and (2).

Needs a CUDA GPU; ``--device cpu --quick`` runs the same code on the CPU (a smoke test of the script).

    python benchmarks/gpu_eval.py                   # on a GPU machine
    python benchmarks/gpu_eval.py --compile
"""
from __future__ import annotations

import sys

import _common as common
import torch

from robustbench_ft.evaluation.dataset_pass import evaluate
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.models.classifier import Classifier


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], images=4096, quick_images=64)
    p.add_argument("--models", default="ViT-B-32,ViT-B-16", help="comma-separated open_clip models")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="amp_bf16", choices=["fp32", "amp_bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (off by default)")
    p.set_defaults(batch_size=256, workers=8)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_eval.py: no CUDA device here; run it on a GPU machine (or --device cpu --quick to smoke-test)")
    work = common.setup(args)
    _, shards = common.benchmark_images(args, work, workers=args.workers)
    decode = "device" if args.device.startswith("cuda") else "fast"
    print(f"== {args.images} JPEGs {args.image_size}, batch {args.batch_size}, {args.workers} workers, "
          f"{args.precision}, compile={args.compile}, device {torch.cuda.get_device_name() if decode == 'device' else 'cpu'}")
    rows = []
    for name in args.models.split(","):
        clip = common.load_model(name)
        model = Classifier.zeroshot(clip, [f"class{i:03d}" for i in range(10)], ["a photo of a {}."])
        model = model.to(args.device).to(memory_format=torch.channels_last).eval()
        forward_model = torch.compile(model) if args.compile else model
        _, forward_s = common.decode_and_forward_costs(shards, clip.preprocess_eval, forward_model, args,
                                                       device=args.device, decode=decode)
        kw = dict(batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision,
                  progress=False, verify="size", compile_model=args.compile)
        chosen, fast = EvalOptions(decode=decode, **kw), EvalOptions(decode="fast", **kw)
        evaluate({"m": model}, shards, clip.preprocess_eval, chosen)  # warm-up (nvJPEG, kernels)
        full_s, _ = common.timed(lambda: evaluate({"m": model}, shards, clip.preprocess_eval, chosen))
        cpu_s, _ = common.timed(lambda: evaluate({"m": model}, shards, clip.preprocess_eval, fast))
        forward_ips, full_ips, cpu_ips = 1 / forward_s, args.images / full_s, args.images / cpu_s
        rows.append({"model": name, "forward only img/s": f"{forward_ips:.0f}",
                     f"{decode} decode + forward img/s": f"{full_ips:.0f}",
                     "CPU decode + forward img/s": f"{cpu_ips:.0f}",
                     "decode+forward / forward": common.verdict(full_ips / forward_ips, 0.7, True)})
    print(common.table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
