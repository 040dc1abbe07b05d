"""Shared fixtures: a tiny synthetic suite (made in the test session) and tiny random CLIP models."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings
from PIL import Image

from robustbench_ft.datasets.registry import get_suite, register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.loading.shard_dataset import ShardDataset
from robustbench_ft.shards.writer import write_shards

torch.set_num_threads(1)

# Fuzz tests are deterministic by default, so CI cannot fail at random: the same examples every run
# (derandomize) and no example database carried between runs. `HYPOTHESIS_PROFILE=explore python -m
# pytest tests/test_hostile.py tests/test_config_types.py` draws fresh random examples, ten times as many
# (tests/fuzzing.py); run it by hand to look for new failures, then pin what it finds as a plain test.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SYNTH_CLASSES = ("red", "green", "blue")
SYNTH_TEMPLATES = ("a photo of {}.", "a {} square.")


def synth_image(label: int, rng: np.random.Generator, inverted: bool = False) -> Image.Image:
    """A 32x32 image whose dominant colour channel is the label, so a model can learn it quickly."""
    arr = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
    y, x = rng.integers(0, 16, size=2)
    arr[y:y + 16, x:x + 16, label] = 220
    if inverted:
        arr = 255 - arr
    return Image.fromarray(arr)


def synth_builder(n: int, seed: int, inverted: bool = False):
    def build(out_dir):
        rng = np.random.default_rng(seed)
        samples = ((f"s{i:05d}", synth_image(i % 3, rng, inverted), i % 3, None) for i in range(n))
        return write_shards(samples, out_dir, name=f"synth-{seed}", classes=list(SYNTH_CLASSES),
                            samples_per_shard=max(1, n // 3))
    return build


def _register_synthetic() -> None:
    try:
        get_suite("synthetic")
        return
    except KeyError:
        pass
    register_dataset(DatasetSpec("synth", SYNTH_CLASSES, SYNTH_TEMPLATES, splits=("train", "val", "test"),
                                 builders={"train": synth_builder(48, 1), "val": synth_builder(12, 2),
                                           "test": synth_builder(24, 3)}, description="synthetic colours"))
    register_dataset(DatasetSpec("synth-inverted", SYNTH_CLASSES, SYNTH_TEMPLATES,
                                 builders={"test": synth_builder(24, 4, inverted=True)}))
    register_suite(Suite("synthetic", reference="synth", shifts=("synth-inverted",), train=("synth", "train"),
                         val=("synth", "val"), baseline=None,
                         method_defaults={"finetune": {"epochs": 1, "batch_size": 8, "warmup_steps": 2, "lr": 1e-3}}))


_register_synthetic()


@pytest.fixture
def run_dirs(tmp_path):
    """Keyword arguments for RunConfig that keep every output of a test under tmp_path."""
    return dict(data_root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
                results_dir=str(tmp_path / "results"), reports_dir=str(tmp_path / "reports"), workers=0,
                eval_batch_size=16)


@pytest.fixture
def shard_reads(monkeypatch):
    """Every shard directory opened for reading (by anything: features, evaluation, training)."""
    seen: list[str] = []
    original = ShardDataset.__init__

    def spy(self, directory, *args, **kwargs):
        seen.append(f"{Path(directory).parent.name}/{Path(directory).name}")
        original(self, directory, *args, **kwargs)

    monkeypatch.setattr(ShardDataset, "__init__", spy)
    return seen
