"""Shared pieces of the evaluation-speed benchmarks (issue 7): data, model, timing, memory, output.

Every benchmark builds its own synthetic, ImageNet-sized JPEGs (smooth colour blobs plus fine
noise, ~500x375, landscape and portrait, quality 90: a decode cost close to real photos'), as an
ImageFolder tree for the reference pipeline and as shard sets for ours, so that both sides of a
ratio read the same images with the same model in the same run. The default model is a ViT-Ti/32 at
224 px (width 192, 12 layers, 3 heads: DeiT-Tiny's shape with 32-px patches) with random weights,
the smallest standard ViT shape at open_clip's 224-px preprocessing; ``--model`` takes any open_clip
name (ViT-S-32, ViT-B-32, ...).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BENCH_MODEL = "bench-vit-ti-32"
_BENCH_CONFIG = {
    "embed_dim": 192,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 192, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 2},
}


def parser(description: str, *, images: int, quick_images: int) -> argparse.ArgumentParser:
    """The flags every benchmark shares: sizes (--images, --quick), model, workers, where to work."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--images", type=int, default=images, help=f"images in the synthetic set (default {images})")
    p.add_argument("--quick", action="store_true", help=f"a small run ({quick_images} images) to check it works")
    p.add_argument("--image-size", default="500x375", help="WxH of the synthetic JPEGs (portrait ones are HxW)")
    p.add_argument("--model", default=BENCH_MODEL, help=f"open_clip model, random weights (default {BENCH_MODEL})")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers on both sides (default 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main process (default 2)")
    p.add_argument("--workdir", default=None, help="keep the generated data here (default: a temporary dir)")
    p.set_defaults(quick_images=quick_images)
    return p


def setup(args: argparse.Namespace) -> Path:
    """Apply the common flags; returns the working directory (kept only when --workdir is given)."""
    if args.quick:
        args.images = args.quick_images
    torch.set_num_threads(args.threads)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        return Path(args.workdir)
    return _temporary_dir("rbft-bench-")


def _temporary_dir(prefix: str) -> Path:
    """A temporary directory removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def textured(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A photo-like test image: smooth colour blobs with fine noise (compresses like a photo, not like noise)."""
    base = Image.fromarray(rng.integers(0, 256, size=(height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8))
    smooth = np.asarray(base.resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
    return Image.fromarray((smooth + rng.integers(-12, 13, size=smooth.shape)).clip(0, 255).astype(np.uint8))


def make_imagefolder(root: Path, n: int, size: str, classes: int = 10, seed: int = 0) -> Path:
    """An ImageFolder tree of ``n`` JPEGs (every third one portrait) in ``classes`` folders; reused if present."""
    done = root / ".complete"
    if done.is_file() and json.loads(done.read_text()) == {"n": n, "size": size, "classes": classes, "seed": seed}:
        return root
    width, height = (int(v) for v in size.lower().split("x"))
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (height, width) if i % 3 == 2 else (width, height)
        textured(w, h, rng).save(folder / f"img{i:06d}.jpg", format="JPEG", quality=90)
    done.write_text(json.dumps({"n": n, "size": size, "classes": classes, "seed": seed}))
    return root


def make_shards(src: Path, out: Path, resize_shorter: int | None = None, workers: int = 2) -> Path:
    """Convert the tree with the harness's converter: the files' own bytes, or resized (re-encoded) JPEGs."""
    from robustbench_ft.convert.imagefolder import write_imagefolder_shards

    if not (out / "manifest.json").is_file():
        n = sum(1 for _ in src.rglob("*.jpg"))
        per_shard = min(256, max(8, n // 8))  # at least 8 shards: shards are what DataLoader workers split
        write_imagefolder_shards(src, out, name="bench", samples_per_shard=per_shard, resize_shorter=resize_shorter,
                                 image_format="keep" if resize_shorter is None else "jpg", workers=workers)
    return out


def benchmark_images(args: argparse.Namespace, work: Path, workers: int = 2) -> tuple[Path, Path]:
    """The run's synthetic ImageFolder tree (``args.images`` of ``args.image_size``) and its full-size shards."""
    folder = make_imagefolder(work / f"folder-{args.image_size}-{args.images}", args.images, args.image_size)
    return folder, make_shards(folder, work / f"shards-full-{args.image_size}-{args.images}", workers=workers)


def load_model(name: str):
    """An open_clip model with random weights (the benchmark ViT-Ti/32 config registered on first use)."""
    import open_clip

    from robustbench_ft.models.clip import load_clip

    if name == BENCH_MODEL and name not in open_clip.list_models():
        directory = _temporary_dir("rbft-bench-config-")
        (directory / f"{BENCH_MODEL}.json").write_text(json.dumps(_BENCH_CONFIG))
        open_clip.add_model_config(directory)
    torch.manual_seed(0)
    return load_clip(name, "random")


def reference_loader(imagefolder: Path, preprocess: Callable, batch_size: int, workers: int):
    """The anchors' pipeline: torchvision ImageFolder + PIL + open_clip's preprocess + DataLoader."""
    from torchvision.datasets import ImageFolder

    return torch.utils.data.DataLoader(ImageFolder(str(imagefolder), transform=preprocess), batch_size=batch_size,
                                       num_workers=workers)


def decode_and_forward_costs(shards: Path, preprocess: Callable, model: torch.nn.Module, args: argparse.Namespace,
                             device: str = "cpu", decode: str = "auto") -> tuple[float, float]:
    """Seconds per image of the input pipeline alone (all workers) and of the forward pass on its output.

    The forward runs on batches decoded beforehand and kept on the device, so it is the model's
    own speed, with the same precision and memory format an evaluation uses.
    """
    from robustbench_ft.evaluation.pipeline import eval_pipeline
    from robustbench_ft.loading.loader import make_loader
    from robustbench_ft.models.clip import autocast
    from robustbench_ft.shards.manifest import Manifest

    manifest = Manifest.load(shards)
    pipeline = eval_pipeline(preprocess, device, manifest.image_format, decode)
    kwargs = dict(pipeline.loader_kwargs)
    loader = make_loader(shards, kwargs.pop("transform", None), args.batch_size, num_workers=args.workers,
                         with_index=True, **kwargs)
    decode_s, batches = timed(lambda: [pipeline.prepare(b[0], b[2]) for b in loader])
    precision = getattr(args, "precision", "fp32")

    @torch.no_grad()
    def forward() -> None:
        with autocast(torch.device(device), precision):
            for x in batches:
                model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    forward()  # warm-up (kernels, allocator, compilation)
    forward_s, _ = timed(forward)
    return decode_s / manifest.num_samples, forward_s / manifest.num_samples


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (e.g. "RssAnon", "VmHWM"), in KiB; 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


@contextmanager
def peak_memory(interval: float = 0.02) -> Iterator[dict]:
    """Peak anonymous resident memory (MiB) of this process while the block runs, sampled.

    Anonymous memory is what a process cannot give back (heap, tensors, in-RAM arrays); memory-mapped
    cache files are page cache the kernel reclaims, so they are reported apart (``hwm_mib`` is the
    kernel's peak resident set, file pages included). DataLoader workers are separate processes.
    """
    out = {"peak_anon_mib": 0.0, "start_anon_mib": _status_kib("RssAnon") / 1024}
    stop = threading.Event()

    def sample() -> None:
        peak = 0
        while not stop.is_set():
            peak = max(peak, _status_kib("RssAnon"))
            stop.wait(interval)
        out["peak_anon_mib"] = max(peak, _status_kib("RssAnon")) / 1024

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["hwm_mib"] = _status_kib("VmHWM") / 1024


def conditions() -> str:
    """What the numbers were measured under (the machine is shared: load matters)."""
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs, load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table of ``rows`` (dicts) in ``columns`` order."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def verdict(ratio: float, target: float, higher_is_better: bool) -> str:
    met = ratio >= target if higher_is_better else ratio <= target
    return f"{ratio:.3f}x (target {'>=' if higher_is_better else '<='} {target}x: {'met' if met else 'NOT met'})"
