"""Robust accuracy of candidates on perturbed copies of the reference test set (see docs/perturbations.md).

One pass over the reference test shards, reading only the seeded subset (``--attack-samples``): each batch is
turned into [0, 1] pixels by the model's eval transform without its final ``Normalize`` (the candidate applies
it, :class:`PixelSpaceModel`), so attacks and corruptions act on pixels and every adversarial input is checked
against its ε-ball and [0, 1] there. Attacks are white box against each candidate itself, in eval mode, fp32
(no autocast), with a seed derived from the run seed and the perturbation's name. Corrupted images do not
depend on the candidate and are made once per batch. Each entry also holds the candidate's clean accuracy on
the same samples, so robust and clean accuracy compare sample for sample.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torchvision.transforms import Compose, Normalize

from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.loading.loader import make_loader
from robustbench_ft.perturbations.attack import PixelSpaceModel, attack_facts, autoattack, perturbation_norms
from robustbench_ft.perturbations.corruptions import corrupt_portfolio, corruption_facts
from robustbench_ft.perturbations.spec import Perturbation, parse_perturbations
from robustbench_ft.shards.urls import load_manifest


def split_normalize(transform: Callable) -> tuple[Callable, tuple[float, ...], tuple[float, ...]]:
    """(the transform up to [0, 1] pixels, its Normalize mean, std): the eval transform must end in Normalize."""
    steps = list(getattr(transform, "transforms", []))
    if not steps or not isinstance(steps[-1], Normalize):
        raise ValueError("perturbation shifts need an eval transform that ends in Normalize (open_clip's does), so "
                         f"that attacks can run on [0, 1] pixels before it; got {transform!r}")
    norm = steps[-1]
    return Compose(steps[:-1]), tuple(float(m) for m in norm.mean), tuple(float(s) for s in norm.std)


def attack_subset(n: int, samples: int | None, seed: int) -> np.ndarray:
    """Sorted test-set indices of the attacked samples: all of them, or ``samples`` drawn without replacement
    from a generator seeded by the run seed (the same subset for every candidate and perturbation)."""
    if samples is None or samples >= n:
        return np.arange(n)
    if samples < 1:
        raise ValueError(f"attack_samples must be >= 1 (or unset for the whole set), got {samples}")
    return np.sort(np.random.default_rng([seed, 0xA77AC]).choice(n, size=samples, replace=False))


def attack_seed(seed: int, name: str) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0] % (2 ** 31))


@dataclass
class _Tally:
    correct: int = 0
    clean: int = 0
    seen: int = 0
    max_distance: float = 0.0
    facts: dict = field(default_factory=dict)


@torch.no_grad()
def _predict(model: PixelSpaceModel, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def score_perturbations(models: Mapping[str, torch.nn.Module], directory: str | Path, transform: Callable,
                        names: tuple[str, ...] | list[str], num_classes: int, options: EvalOptions, *,
                        samples: int | None = None, seed: int = 0) -> dict[str, dict[str, dict]]:
    """``{model: {perturbation: entry}}``: each entry ``top1`` (robust accuracy), ``clean_top1`` (on the same
    samples), ``n`` (samples attacked), ``population`` (test-set size), ``subset_seed``, ``max_distance`` (largest
    perturbation norm seen, attacks only) and what was run (:func:`attack_facts` / :func:`corruption_facts`)."""
    perturbations = parse_perturbations(names)
    pixels_of, mean, std = split_normalize(transform)
    wrapped = {name: PixelSpaceModel(m, mean, std) for name, m in models.items()}
    n = load_manifest(directory).num_samples
    subset = attack_subset(n, samples, seed)
    chosen = np.zeros(n, dtype=bool)
    chosen[subset] = True
    tallies = {m: {p.name: _Tally(facts=_facts(p, num_classes)) for p in perturbations} for m in models}
    loader = make_loader(directory, pixels_of, options.batch_size, num_workers=options.workers, with_index=True,
                         verify=options.verify)
    device = options.torch_device
    for images, labels, index in loader:
        keep = torch.from_numpy(chosen[index.numpy()])
        if not keep.any():
            continue
        x, y, idx = images[keep].to(device).float(), labels[keep].to(device), index[keep].numpy()
        corrupted = {p.name: torch.from_numpy(corrupt_portfolio(x.cpu().numpy(), idx, p.severity, seed)).to(device)
                     for p in perturbations if p.kind == "corruptions"}
        for model_name, model in wrapped.items():
            with torch.autocast(device.type, enabled=False):
                _score_batch(model, x, y, perturbations, corrupted, tallies[model_name], seed, num_classes,
                             options.batch_size)
    return {m: {p: _entry(t, n, seed, samples) for p, t in per.items()} for m, per in tallies.items()}


def _facts(p: Perturbation, num_classes: int) -> dict:
    return attack_facts(p.norm, p.eps, num_classes) if p.kind == "autoattack" else corruption_facts(p.severity)


def _score_batch(model: PixelSpaceModel, x: torch.Tensor, y: torch.Tensor, perturbations: list[Perturbation],
                 corrupted: dict[str, torch.Tensor], tallies: dict[str, _Tally], seed: int, num_classes: int,
                 batch_size: int) -> None:
    model.eval()
    clean = int((_predict(model, x, batch_size) == y).sum())
    for p in perturbations:
        t = tallies[p.name]
        if p.kind == "autoattack":
            x_p = autoattack(model, x, y, p.norm, p.eps, attack_seed(seed, p.name), num_classes, batch_size)
            t.max_distance = max(t.max_distance, float(perturbation_norms(x_p, x, p.norm).max()))
        else:
            x_p = corrupted[p.name]
        t.correct += int((_predict(model, x_p, batch_size) == y).sum())
        t.clean += clean
        t.seen += len(y)


def _entry(t: _Tally, population: int, seed: int, samples: int | None) -> dict:
    entry = {"top1": t.correct / t.seen, "clean_top1": t.clean / t.seen, "n": t.seen, "population": population,
             "subset_seed": seed if samples is not None and samples < population else None, **t.facts}
    if t.facts.get("attack") == "autoattack":
        entry["max_distance"] = t.max_distance
    return entry
