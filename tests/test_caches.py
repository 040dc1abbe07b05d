"""Feature and logits caches: a second report costs no forward pass; any changed key part misses.

Keys are (classifier or encoder content hash, manifest hash, transform id). Each test changes one
part and checks that exactly what depends on it is recomputed, counting encoder forward calls.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from robustbench_ft.evaluation.cache import ArrayCache
from robustbench_ft.evaluation.dataset_pass import evaluate, evaluate_cached
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.evaluation.rows import RowStore
from robustbench_ft.models.classifier import Classifier, interpolate
from robustbench_ft.models.clip import load_clip
from robustbench_ft.shards.writer import write_shards

CLASSES = ("a", "b", "c")


def make_images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)) for _ in range(n)]


def write_set(directory, images):
    return write_shards(((f"s{i:03d}", im, i % 3, None) for i, im in enumerate(images)), directory, "set",
                        CLASSES, samples_per_shard=7, image_format="jpg")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("rbft-tiny-vit", "random")


@pytest.fixture
def zeroshot(clip):
    return Classifier.zeroshot(clip, CLASSES, ["{}"])


@pytest.fixture
def dataset(tmp_path):
    write_set(tmp_path / "set", make_images(18, 0))
    return tmp_path / "set"


class ForwardCounter:
    """Counts forward calls of an image encoder (a module shared by several classifiers counts once per batch)."""

    def __init__(self, *modules: torch.nn.Module):
        self.calls = 0
        for m in modules:
            m.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.calls += 1


def run(classifiers, directory, transform, tmp_path, **options):
    return evaluate_cached(classifiers, directory, transform, ArrayCache(tmp_path / "cache" / "logits"),
                           EvalOptions(batch_size=8, progress=False, **options),
                           features=ArrayCache(tmp_path / "cache" / "features"))


def test_second_report_costs_no_forward_pass(clip, zeroshot, dataset, tmp_path):
    counter = ForwardCounter(zeroshot.visual)
    first = run({"zs": zeroshot}, dataset, clip.preprocess_eval, tmp_path)
    assert counter.calls > 0 and first.forward_passes == 1
    counter.calls = 0
    second = run({"zs": zeroshot}, dataset, clip.preprocess_eval, tmp_path)
    assert counter.calls == 0 and second.forward_passes == 0
    np.testing.assert_array_equal(first.logits["zs"], second.logits["zs"])
    np.testing.assert_array_equal(first.labels, second.labels)
    assert not list((tmp_path / "cache").rglob(".*tmp*")), "temporary row files must not be left behind"


def test_changed_weights_miss_the_caches(clip, zeroshot, dataset, tmp_path):
    run({"zs": zeroshot}, dataset, clip.preprocess_eval, tmp_path)
    other_head = Classifier(zeroshot.visual, torch.randn_like(zeroshot.head.weight), zeroshot.info)
    counter = ForwardCounter(zeroshot.visual)
    out = run({"zs": zeroshot, "new-head": other_head}, dataset, clip.preprocess_eval, tmp_path)
    # a new head on a cached encoder: scored from the cached features, no image touched
    assert counter.calls == 0 and out.forward_passes == 0
    direct = evaluate({"new-head": other_head}, dataset, clip.preprocess_eval, EvalOptions(batch_size=8, progress=False))
    np.testing.assert_allclose(out.logits["new-head"], direct.logits["new-head"], rtol=1e-5, atol=1e-5)

    changed = Classifier.zeroshot(clip, CLASSES, ["{}"])
    with torch.no_grad():
        changed.visual.conv1.weight.add_(0.01)  # a changed encoder misses both caches
    counter = ForwardCounter(changed.visual)
    out = run({"changed": changed}, dataset, clip.preprocess_eval, tmp_path)
    assert counter.calls > 0 and out.forward_passes == 1
    assert not np.array_equal(out.logits["changed"], run({"zs": zeroshot}, dataset, clip.preprocess_eval,
                                                         tmp_path).logits["zs"])


def test_changed_shard_misses_the_caches(clip, zeroshot, tmp_path):
    images = make_images(18, 0)
    write_set(tmp_path / "set", images)
    before = run({"zs": zeroshot}, tmp_path / "set", clip.preprocess_eval, tmp_path)
    images[5] = make_images(1, 99)[0]  # one image differs: its shard's hash, hence the manifest hash, changes
    write_set(tmp_path / "set", images)
    counter = ForwardCounter(zeroshot.visual)
    after = run({"zs": zeroshot}, tmp_path / "set", clip.preprocess_eval, tmp_path)
    assert counter.calls > 0 and after.forward_passes == 1
    assert not np.array_equal(before.logits["zs"][5], after.logits["zs"][5])
    np.testing.assert_allclose(before.logits["zs"][7:], after.logits["zs"][7:], rtol=1e-5, atol=1e-5)


def test_changed_transform_misses_the_caches(clip, zeroshot, dataset, tmp_path):
    run({"zs": zeroshot}, dataset, clip.preprocess_eval, tmp_path)
    counter = ForwardCounter(zeroshot.visual)
    # the same transform through another decode path names other pixels: a miss
    out = run({"zs": zeroshot}, dataset, clip.preprocess_eval, tmp_path, decode="reference")
    assert counter.calls > 0 and out.forward_passes == 1
    other = load_clip("rbft-tiny-vit", "random").preprocess_eval
    other.transforms[-1].mean = (0.5, 0.5, 0.5)  # another normalisation
    counter.calls = 0
    out = run({"zs": zeroshot}, dataset, other, tmp_path)
    assert counter.calls > 0 and out.forward_passes == 1
    counter.calls = 0
    assert run({"zs": zeroshot}, dataset, other, tmp_path).forward_passes == 0 and counter.calls == 0


def test_wise_ft_sweep_of_linear_heads_is_scored_from_features(clip, zeroshot, dataset, tmp_path):
    """11 α of a linear-probe WiSE-FT share the frozen encoder: one forward pass, then none."""
    probe = Classifier(zeroshot.visual, torch.randn_like(zeroshot.head.weight), zeroshot.info)
    heads = {f"a{a:.1f}": interpolate(zeroshot, probe, a) for a in np.linspace(0, 1, 11)}
    assert all(h.visual is zeroshot.visual for h in heads.values())
    counter = ForwardCounter(zeroshot.visual)
    first = run(heads, dataset, clip.preprocess_eval, tmp_path)
    batches = counter.calls
    assert first.forward_passes == 1 and batches == 3  # 18 images, batch 8: one encoder call per batch
    more = {f"b{a:.2f}": interpolate(zeroshot, probe, a) for a in (0.05, 0.15)}
    counter.calls = 0
    assert run(more, dataset, clip.preprocess_eval, tmp_path).forward_passes == 0 and counter.calls == 0


def test_streamed_logits_equal_in_memory_ones_and_stay_on_disk(clip, zeroshot, dataset, tmp_path):
    in_memory = evaluate({"zs": zeroshot}, dataset, clip.preprocess_eval, EvalOptions(batch_size=8, progress=False, workers=2))
    streamed = evaluate({"zs": zeroshot}, dataset, clip.preprocess_eval, EvalOptions(batch_size=8, progress=False, workers=2), store=tmp_path / "rows")
    assert isinstance(streamed.logits["zs"], np.memmap)
    np.testing.assert_array_equal(in_memory.logits["zs"], streamed.logits["zs"])
    np.testing.assert_array_equal(in_memory.labels, streamed.labels)


def test_rowstore_writes_rows_in_any_order(tmp_path):
    store = RowStore(10, tmp_path)
    rows = store.new(3)
    values = np.arange(30, dtype=np.float32).reshape(10, 3)
    for index in (np.array([7, 8, 9]), np.array([3, 0, 1, 2]), np.array([6, 4, 5])):
        rows.write(index, values[index])
    np.testing.assert_array_equal(rows.result(), values)
    store.discard()
    assert not list(tmp_path.iterdir())


def test_failed_pass_leaves_no_files(clip, zeroshot, dataset, tmp_path):
    def fail(module, inputs, output):
        raise RuntimeError("boom")

    broken = Classifier(zeroshot.visual, zeroshot.head.weight.detach().clone(), zeroshot.info)
    broken.head.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        run({"broken": broken}, dataset, clip.preprocess_eval, tmp_path)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_damaged_cache_entry_is_recomputed(clip, zeroshot, dataset, tmp_path):
    run({"zs": zeroshot}, dataset, clip.preprocess_eval, tmp_path)
    for entry in (tmp_path / "cache" / "logits").glob("*.labels.npy"):
        entry.write_bytes(b"not an array")
    counter = ForwardCounter(zeroshot.visual)
    out = run({"zs": zeroshot}, dataset, clip.preprocess_eval, tmp_path, decode="fast")
    # the features cache still holds the encoder's features: the logits come back without a forward pass
    assert out.forward_passes == 0 and counter.calls == 0
    assert len(out.labels) == 18
