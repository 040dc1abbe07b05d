"""Linear probe: L2-regularised logistic regression on frozen CLIP image features (Radford et al. 2021).

As in the CLIP paper (App. A.3): the image features of the training split are computed once with the
evaluation transform, a multinomial logistic regression is fit with L-BFGS (≤ 1,000 iterations), and
the regularisation strength is chosen by a sweep over 96 log-spaced values of C in [1e-6, 1e6] on a
held-out split of the *training* data: the suite's val split, or, when it has none, a held-out
fraction of the training split (then the probe is refit on the whole training split at the chosen C).
The sweep runs from strong to weak regularisation, each fit warm-started from the previous solution
(the regularisation path; the FLYP authors' probe does the same with scikit-learn's ``warm_start``),
the first from ``--init``: the zeros of scikit-learn, or the zero-shot head.
Test and shift data are never read. C has scikit-learn's meaning: the objective is
``0.5·‖W‖² + C·Σ_i CE_i`` (the bias is not penalised).

The features are L2-normalised, as :meth:`Classifier.features` computes them, so the probe's weights
are a drop-in head for the zero-shot classifier's encoder. The resulting classifier *shares* that
encoder module: WiSE-FT over a linear probe then mixes heads only and evaluation encodes each image
once for the zero-shot model, the probe and every α (which is why those coincide with the
output-space ensemble, Wortsman et al. 2022). Features are cached under ``<cache_dir>/features``,
keyed by encoder content, shard manifest and transform.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from robustbench_ft.evaluation.cache import ArrayCache
from robustbench_ft.loading.eval_decode import transform_id
from robustbench_ft.loading.loader import make_loader
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.registry import register_method
from robustbench_ft.models.classifier import Classifier, ClassifierInfo, same_encoder, state_hash
from robustbench_ft.models.clip import autocast
from robustbench_ft.shards.manifest import Manifest

INITS = ("zeros", "zeroshot")


@dataclass(frozen=True)
class LinearProbeOptions:
    c_min: float = 1e-6          # smallest C of the sweep (strongest regularisation); CLIP paper range 1e-6..1e6
    c_max: float = 1e6           # largest C of the sweep
    c_steps: int = 96            # log-spaced values of C from c_min to c_max (CLIP paper: 96); 1 = just c_min
    max_iter: int = 1000         # L-BFGS iterations per fit (CLIP paper: 1,000)
    init: str = "zeros"          # start of the C path: "zeros" (scikit-learn) or "zeroshot" (the zero-shot head)
    holdout_fraction: float = 0.1  # share of the training split held out for choosing C when the suite has no val split

    def __post_init__(self) -> None:
        if not 0 < self.c_min <= self.c_max or self.c_steps < 1:
            raise ValueError(f"linear-probe: need 0 < c_min <= c_max and c_steps >= 1; got c_min={self.c_min}, "
                             f"c_max={self.c_max}, c_steps={self.c_steps}")
        if self.c_steps == 1 and self.c_min != self.c_max:
            raise ValueError("linear-probe: c_steps=1 needs c_min == c_max (the one C to use)")
        if self.init not in INITS:
            raise ValueError(f"linear-probe: init must be one of {INITS}, got {self.init!r}")
        if self.max_iter < 1 or not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError("linear-probe: max_iter must be >= 1 and holdout_fraction in (0, 1)")

    @property
    def c_grid(self) -> list[float]:
        """The values of C tried, ascending (from strong to weak regularisation)."""
        if self.c_steps == 1:
            return [self.c_min]
        return [float(c) for c in np.logspace(math.log10(self.c_min), math.log10(self.c_max), self.c_steps)]


@torch.no_grad()
def split_features(ctx: MethodContext, encoder: Classifier, directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image features [N, D] and labels [N] of a shard set, in manifest order, with the eval transform.

    Cached on disk by (encoder content hash, manifest hash, transform id): a second probe, a
    different C grid or an LP-FT run on the same encoder reads them back instead of encoding again.
    """
    transform = ctx.clip.preprocess_eval
    manifest = Manifest.load(directory)
    cache = ArrayCache(Path(ctx.config.cache_dir) / "features", ctx.log)
    key = cache.path(state_hash(encoder.visual), manifest.content_hash(), transform_id(transform))
    hit = cache.get(key, rows=manifest.num_samples)
    if hit is None:
        device = ctx.clip.device
        encoder.eval()
        n = manifest.num_samples
        feats: np.ndarray | None = None
        labels = np.full(n, -1, dtype=np.int64)
        loader = make_loader(directory, transform, ctx.config.eval_batch_size, num_workers=ctx.config.workers,
                             with_index=True)
        with tqdm(total=n, desc=f"features {directory.parent.name}/{directory.name}", disable=not ctx.progress,
                  unit="img", dynamic_ncols=True) as bar:
            for images, targets, index in loader:
                with autocast(device, ctx.config.precision):
                    out = encoder.features(images.to(device, non_blocking=True)).float().cpu().numpy()
                if feats is None:
                    feats = np.zeros((n, out.shape[1]), dtype=np.float32)
                feats[index.numpy()] = out
                labels[index.numpy()] = targets.numpy()
                bar.update(len(index))
        if feats is None or (labels < 0).any():
            raise RuntimeError(f"{directory}: could not read every sample the manifest lists ({n})")
        cache.put(key, feats, labels)
        hit = (feats, labels)
    return torch.from_numpy(hit[0]), torch.from_numpy(hit[1])


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, c: float, weight: torch.Tensor,
                            bias: torch.Tensor, max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS, starting from (weight, bias).

    Minimises ``mean_i CE_i + ‖W‖² / (2·C·N)``, which is scikit-learn's ``0.5·‖W‖² + C·Σ_i CE_i``
    divided by C·N (same minimiser, better-scaled numbers). Returns the weights [K, D] and bias [K].
    """
    W = weight.detach().clone().float().requires_grad_(True)
    b = bias.detach().clone().float().requires_grad_(True)
    x, y = features.float(), labels.long()
    reg = 1.0 / (2.0 * c * len(y))
    optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=10, tolerance_grad=1e-6,
                                  tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ W.T + b, y) + reg * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    if not (torch.isfinite(W).all() and torch.isfinite(b).all()):
        raise FloatingPointError(f"linear-probe: the fit at C={c:g} diverged; narrow the C range (--c-max)")
    return W.detach(), b.detach()


def accuracy(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    return float(((features.float() @ weight.T + bias).argmax(dim=1) == labels).float().mean())


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): a seeded random ``fraction`` of range(n) held out (at least one each)."""
    if n < 2:
        raise ValueError(f"linear-probe: a held-out split needs at least 2 training samples, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = min(n - 1, max(1, round(fraction * n)))
    return order[held:].sort().values, order[:held].sort().values


def linear_probe(ctx: MethodContext, opts: LinearProbeOptions) -> Classifier:
    """Fit the probe on the zero-shot classifier's frozen encoder; C chosen on held-out training data."""
    zs = ctx.zeroshot
    x_train, y_train = split_features(ctx, zs, ctx.split_dir("train"))
    if ctx.suite.val is not None:
        x_fit, y_fit = x_train, y_train
        x_val, y_val = split_features(ctx, zs, ctx.split_dir("val"))
        selection = f"val split {'/'.join(ctx.suite.val)}"
    else:
        fit_idx, val_idx = holdout_split(len(y_train), opts.holdout_fraction, ctx.config.seed)
        x_fit, y_fit, x_val, y_val = x_train[fit_idx], y_train[fit_idx], x_train[val_idx], y_train[val_idx]
        selection = f"{opts.holdout_fraction:g} of the training split held out (seed {ctx.config.seed})"
    device = ctx.clip.device
    x_fit, y_fit, x_val, y_val = (t.to(device) for t in (x_fit, y_fit, x_val, y_val))
    if opts.init == "zeroshot":
        w0, b0 = zs.head.weight.detach().float(), zs.head.bias.detach().float()
    else:
        w0 = torch.zeros(zs.num_classes, x_fit.shape[1], device=device)
        b0 = torch.zeros(zs.num_classes, device=device)

    fits = []  # (held-out top-1, C, W, b), C ascending: a regularisation path, each fit warm-started from the last
    W, b = w0, b0
    for c in tqdm(opts.c_grid, desc="linear probe C sweep", disable=not ctx.progress, dynamic_ncols=True):
        W, b = fit_logistic_regression(x_fit, y_fit, c, W, b, opts.max_iter)
        fits.append((accuracy(x_val, y_val, W, b), c, W, b))
    val_acc, c, W, b = max(fits, key=lambda fit: fit[0])  # the first maximum: ties keep the stronger regularisation
    if ctx.suite.val is None:  # refit on the whole training split, held-out part included
        W, b = fit_logistic_regression(x_train.to(device), y_train.to(device), c, W, b, opts.max_iter)
    ctx.log(f"linear probe: C={c:.3g} (held-out top-1 {100 * val_acc:.1f}%, chosen on the {selection})")
    provenance: dict[str, Any] = {"pretrained": ctx.clip.pretrained, "linear_probe": {
        "c": c, "val_top1": val_acc, "selection": selection, "init": opts.init,
        "sweep": [{"c": fc, "val_top1": acc} for acc, fc, _, _ in fits]}}
    probe = Classifier(zs.visual, W, ClassifierInfo(zs.info.model, list(zs.info.classnames),
                                                    list(zs.info.templates), provenance))
    with torch.no_grad():
        probe.head.bias.copy_(b)
    return probe.to(device)


@register_method("linear-probe", paper="Radford et al., Learning Transferable Visual Models From Natural Language "
                 "Supervision, ICML 2021 (App. A.3: L-BFGS logistic regression, C swept on held-out data)",
                 defaults="CLIP paper App. A.3: 96 log-spaced C in [1e-6, 1e6], L-BFGS up to 1,000 iterations")
class LinearProbe:
    """Logistic regression on frozen, cached image features; C chosen on held-out training data."""

    options = LinearProbeOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        probe = ctx.cached_classifier(lambda: linear_probe(ctx, ctx.options))
        if probe.visual is not ctx.zeroshot.visual and same_encoder(probe, ctx.zeroshot):
            probe.visual = ctx.zeroshot.visual  # loaded from the cache: share the encoder again
        return [Candidate("linear-probe", probe, alpha=1.0, endpoint="finetuned", base="linear-probe")]
