"""Contrastive pretraining of the embedded demo CLIP model on a procedurally generated digit corpus.

The demo suite needs a zero-shot model that runs offline; no public checkpoint is small enough to
ship, so the project pretrains its own, CLIP-style, on rendered digits (``robustbench_ft.demo.render``:
pretraining fonts and hand-drawn-like strokes, never MNIST or the held-out fonts) with varied captions.
Zero-shot accuracy on MNIST is then a true zero-shot number.

Two departures from plain CLIP, both needed at this tiny scale (found by trial):
- *soft same-class targets*: a batch of 256 captions over 10 digits holds many captions of the same
  digit, and treating them as negatives makes the plain loss collapse; all pairs with the same digit
  are positives (uniform target over them). With all digits distinct this is exactly the CLIP loss.
- *text tower frozen at first*: the image tower first aligns to the fixed random text embedding,
  then both towers train together.
"""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save

from robustbench_ft.demo.digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, load_mnist
from robustbench_ft.demo.fonts import PRETRAIN_FONTS, font_paths
from robustbench_ft.demo.render import COLOURS, make_caption, sample_colours, sample_rendering
from robustbench_ft.models import load_clip, zeroshot_weights
from robustbench_ft.util import atomic_write_bytes, atomic_write_text

_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_TABLE = torch.tensor([COLOURS[c] for c in _COLOUR_NAMES], dtype=torch.float32) / 255.0


@dataclass(frozen=True)
class PretrainDemoConfig:
    """Every knob of the demo pretraining; the defaults produced the shipped ``rbft-demo-vit`` weights."""

    model: str = "rbft-demo-vit"
    seed: int = 0
    corpus_size: int = 60_000       # rendered (mask, caption) pairs, drawn once, reused every epoch
    stroke_fraction: float = 0.5    # share of hand-drawn-like stroke digits (the rest: pretraining fonts)
    render_size: int = 28
    steps: int = 1400
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    text_frozen_fraction: float = 0.25  # text tower frozen for this share of the steps
    max_noise: float = 0.08         # per-image Gaussian pixel noise std, in [0, 1] units, drawn uniformly
    render_workers: int = 2
    eval_images: int = 10_000       # images per zero-shot evaluation set for the sidecar; 0 skips evaluation
    threads: int = 0                # torch CPU threads; 0 keeps torch's default


# ---------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """Ink masks, colours, labels and tokenised captions: the whole pretraining set, in memory."""

    masks: torch.Tensor   # (N, S, S) uint8
    fg: torch.Tensor      # (N,) colour index
    bg: torch.Tensor      # (N,) colour index
    labels: torch.Tensor  # (N,) digit
    tokens: torch.Tensor  # (N, context_length) int64


def _render_chunk(args: tuple[np.random.SeedSequence, int, float, int]) -> tuple[np.ndarray, ...]:
    """Render one chunk of the corpus from its own seed (so the result does not depend on worker count)."""
    seed, n, stroke_fraction, size = args
    rng = np.random.default_rng(seed)
    fonts = font_paths(PRETRAIN_FONTS)
    masks = np.empty((n, size, size), np.uint8)
    fg, bg, labels = (np.empty(n, np.int64) for _ in range(3))
    captions = []
    for i in range(n):
        digit = int(rng.integers(10))
        font = None if rng.random() < stroke_fraction else fonts[int(rng.integers(len(fonts)))]
        style = "plain" if rng.random() < 0.1 else "random"
        r = sample_rendering(digit, font, rng, size=size, style=style)
        attrs = dict(r.attributes, **sample_colours(rng))
        masks[i] = np.rint(r.mask * 255)
        fg[i], bg[i], labels[i] = _COLOUR_NAMES.index(attrs["fg"]), _COLOUR_NAMES.index(attrs["bg"]), digit
        captions.append(make_caption(digit, attrs, rng))
    return masks, fg, bg, labels, np.asarray(captions, dtype=object)


def build_corpus(config: PretrainDemoConfig, tokenizer, chunk: int = 2000) -> Corpus:
    """Render ``config.corpus_size`` digits with captions, in seeded chunks, and tokenise the captions."""
    sizes = [min(chunk, config.corpus_size - s) for s in range(0, config.corpus_size, chunk)]
    seeds = np.random.SeedSequence([config.seed, 1]).spawn(len(sizes))
    jobs = [(s, n, config.stroke_fraction, config.render_size) for s, n in zip(seeds, sizes)]
    if config.render_workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(config.render_workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(j) for j in jobs]
    masks, fg, bg, labels, captions = (np.concatenate(p) for p in zip(*parts))
    unique, inverse = np.unique(captions.astype(str), return_inverse=True)
    tokens = tokenizer(list(unique))[torch.from_numpy(inverse.reshape(-1))]
    return Corpus(torch.from_numpy(masks), torch.from_numpy(fg), torch.from_numpy(bg),
                  torch.from_numpy(labels), tokens)


_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)  # open_clip's CLIP normalisation
_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def make_batch(corpus: Corpus, idx: torch.Tensor, image_size: int, max_noise: float,
               gen: torch.Generator) -> torch.Tensor:
    """Colour the masks, add fresh noise, resize and normalise as the eval transform does (bicubic, CLIP stats)."""
    m = corpus.masks[idx].float().div(255).unsqueeze(1)
    fg = _COLOUR_TABLE[corpus.fg[idx]].view(-1, 3, 1, 1)
    bg = _COLOUR_TABLE[corpus.bg[idx]].view(-1, 3, 1, 1)
    x = bg + (fg - bg) * m
    sigma = torch.rand(len(idx), 1, 1, 1, generator=gen) * max_noise
    x = (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
    return (x - _MEAN) / _STD


# ---------------------------------------------------------------------------- loss


def soft_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
                   logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP cross-entropy whose targets spread uniformly over all same-label pairs.

    Features must be L2-normalised.  With pairwise distinct labels the target is the identity and
    this is exactly open_clip's ``ClipLoss``.
    """
    logits = logit_scale * image_features @ text_features.T
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)  # symmetric relation: same row/column sums
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(target * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


# ---------------------------------------------------------------------------- evaluation


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits (bright on dark, like MNIST) as uint8 28×28 images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    up = np.stack([np.asarray(Image.fromarray(im).resize((20, 20), Image.BICUBIC)) for im in imgs])
    out = np.zeros((len(imgs), 28, 28), np.uint8)
    out[:, 4:24, 4:24] = up
    return out, d.target.astype(np.int64)


@torch.no_grad()
def zero_shot_accuracy(model: torch.nn.Module, tokenizer, preprocess, images: np.ndarray, labels: np.ndarray,
                       batch_size: int = 500) -> float:
    """Top-1 zero-shot accuracy of grayscale uint8 images with the demo suite's class names and templates."""
    model.eval()
    head = zeroshot_weights(model, tokenizer, DIGIT_CLASSNAMES, DIGIT_TEMPLATES)
    correct = 0
    for s in range(0, len(images), batch_size):
        x = torch.stack([preprocess(Image.fromarray(im).convert("RGB")) for im in images[s:s + batch_size]])
        feats = F.normalize(model.encode_image(x).float(), dim=-1)
        correct += int((feats @ head.T).argmax(1).eq(torch.from_numpy(labels[s:s + batch_size])).sum())
    return correct / len(images)


def evaluate_demo(model: torch.nn.Module, tokenizer, preprocess, n: int = 10_000) -> dict[str, float]:
    """Zero-shot accuracy on MNIST test, inverted MNIST test and scikit-learn digits (first ``n`` of each)."""
    x, y = load_mnist()["test"]
    x, y = x[:n], y[:n]
    sx, sy = _sklearn_digits()
    return {
        "mnist_test": zero_shot_accuracy(model, tokenizer, preprocess, x, y),
        "mnist_test_inverted": zero_shot_accuracy(model, tokenizer, preprocess, 255 - x, y),
        "sklearn_digits": zero_shot_accuracy(model, tokenizer, preprocess, sx[:n], sy[:n]),
    }


# ---------------------------------------------------------------------------- training


def _lr_at(step: int, config: PretrainDemoConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _set_text_trainable(model: torch.nn.Module, trainable: bool) -> None:
    for name, p in model.named_parameters():
        if not name.startswith("visual.") and name != "logit_scale":
            p.requires_grad_(trainable)


def _train(model: torch.nn.Module, corpus: "Corpus", image_size: int, config: PretrainDemoConfig, start: float,
           progress: bool) -> list[float]:
    """The contrastive training loop (AdamW without decay on biases and embeddings, text tower frozen
    for the first ``text_frozen_fraction`` of the steps); returns the loss of every step."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(config.seed)
    frozen_until = int(config.text_frozen_fraction * config.steps)
    _set_text_trainable(model, frozen_until == 0)
    model.train()
    order = torch.randperm(len(corpus.labels), generator=gen)
    cursor, losses = 0, []
    for step in range(config.steps):
        if step == frozen_until:
            _set_text_trainable(model, True)
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(corpus.labels), generator=gen), 0
        idx = order[cursor:cursor + config.batch_size]
        cursor += config.batch_size
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, config)
        images = make_batch(corpus, idx, image_size, config.max_noise, gen)
        img_f, txt_f, scale = model(images, corpus.tokens[idx])
        loss = soft_clip_loss(img_f, txt_f, corpus.labels[idx], scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if progress and (step + 1) % 100 == 0:
            print(f"step {step + 1}/{config.steps} loss {np.mean(losses[-100:]):.4f} "
                  f"scale {float(scale):.1f} {time.time() - start:.0f}s", flush=True)
    return losses


def pretrain_demo(config: PretrainDemoConfig, out_path: Path, progress: bool = True) -> dict:
    """Pretrain ``config.model`` contrastively on the rendered corpus; write ``<out>.safetensors`` + ``<out>.json``.

    ``out_path`` may be given with or without the ``.safetensors`` suffix.  Returns the sidecar summary
    (config, steps, wall time, zero-shot accuracies measured on MNIST test and two shifts of it).
    """
    start = time.time()
    out_path = Path(out_path)
    stem = out_path.with_suffix("") if out_path.suffix == ".safetensors" else out_path
    stem.parent.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    loaded = load_clip(config.model, "random")
    model, tokenizer = loaded.model, loaded.tokenizer
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size

    corpus = build_corpus(config, tokenizer)
    if progress:
        print(f"corpus: {len(corpus.labels)} images rendered in {time.time() - start:.0f}s", flush=True)

    losses = _train(model, corpus, image_size, config, start, progress)
    train_time = time.time() - start
    model.eval()
    accuracy = evaluate_demo(model, tokenizer, loaded.preprocess_eval, config.eval_images) if config.eval_images else {}
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    weights = stem.with_name(stem.name + ".safetensors")
    atomic_write_bytes(weights, save(state, metadata={"model": config.model}))
    summary = {
        "model": config.model, "weights": weights.name, "seed": config.seed, "steps": config.steps,
        "config": asdict(config), "train_wall_time_s": round(train_time, 1),
        "wall_time_s": round(time.time() - start, 1), "final_loss": float(np.mean(losses[-100:])),
        "zero_shot_accuracy": accuracy, "zero_shot_eval_images": config.eval_images,
        "torch_version": torch.__version__,
    }
    sidecar = stem.with_name(stem.name + ".json")
    atomic_write_text(sidecar, json.dumps(summary, indent=2) + "\n")
    if progress:
        print(json.dumps(accuracy), flush=True)
    return summary
