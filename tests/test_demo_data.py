"""The embedded demo suite's data: declarations, builders, determinism, and the image transforms."""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustbench_ft.datasets.registry import get_dataset, get_suite
from robustbench_ft.demo import samples as demo
from robustbench_ft.demo.corruptions import CORRUPTIONS
from robustbench_ft.demo.digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES
from robustbench_ft.demo.fonts import HELDOUT_FONTS
from robustbench_ft.shards.manifest import Manifest
from robustbench_ft.shards.reader import RawSample, read_shard
from robustbench_ft.shards.verify import verify_shards


def _samples(directory: Path) -> list[RawSample]:
    manifest = verify_shards(directory)
    return [s for path in manifest.shard_paths(directory) for s in read_shard(path, len(manifest.classes))]


def _decode(sample: RawSample) -> Image.Image:
    return Image.open(io.BytesIO(sample.image_bytes))


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    return demo._mnist()["test"]


def test_demo_suite_is_declared() -> None:
    suite = get_suite("demo")
    assert suite.reference == "mnist"
    assert suite.shifts == ("sklearn-digits", "printed-digits", "mnist-inverted", "mnist-c")
    assert suite.train == ("mnist", "train") and suite.val == ("mnist", "val")
    assert suite.baseline == "demo-zoo" and suite.description
    for name in suite.eval_datasets:
        spec = get_dataset(name)
        assert spec.classnames == DIGIT_CLASSNAMES and spec.templates == DIGIT_TEMPLATES
        assert spec.source and spec.description
        assert set(spec.builders) == set(spec.splits) and "test" in spec.splits
    assert get_dataset("mnist").splits == ("train", "val", "test")


def test_mnist_has_the_standard_split_sizes() -> None:
    sizes = {split: len(images) for split, (images, _) in demo._mnist().items()}
    assert sizes == {"train": 50_000, "val": 10_000, "test": 10_000}


# The full builds run once; rebuilding a prefix (limit=) and finding the same bytes checks determinism
# at a fraction of the cost (sample i depends only on i, so a prefix is the full build's first samples).


def test_sklearn_digits_full_build_is_deterministic(tmp_path: Path) -> None:
    assert demo.build_sklearn_digits(tmp_path / "full").num_samples == 1797
    demo.build_sklearn_digits(tmp_path / "prefix", limit=100)
    samples = _samples(tmp_path / "full")
    assert _samples(tmp_path / "prefix") == samples[:100]
    assert samples[0].key == "sklearn-digits-test-000000"
    assert set(Counter(s.label for s in samples)) == set(range(10))
    image = _decode(samples[0])
    assert image.mode == "L" and image.size == (28, 28)
    pixels = np.asarray(image)
    assert pixels.max() > 200 and np.median(pixels) < 100  # bright digit on a dark ground, like MNIST


def test_printed_digits_full_build_is_balanced_and_deterministic(tmp_path: Path) -> None:
    assert demo.build_printed_digits(tmp_path / "full").num_samples == demo.PRINTED_DIGITS_SIZE
    demo.build_printed_digits(tmp_path / "prefix", limit=100)
    samples = _samples(tmp_path / "full")
    assert _samples(tmp_path / "prefix") == samples[:100]
    pairs = Counter((s.label, s.meta["font"]) for s in samples)
    assert set(pairs) == {(d, f) for d in range(10) for f in HELDOUT_FONTS}
    assert set(pairs.values()) == {demo.PRINTED_DIGITS_SIZE // 50}
    pixels = np.asarray(_decode(samples[0]))
    assert pixels.shape == (28, 28) and pixels[0, 0] == 0 and pixels.max() > 200


@pytest.mark.parametrize("build", [
    lambda out, limit: demo.build_mnist(out, "test", limit=limit),
    demo.build_mnist_inverted,
    demo.build_mnist_c,
], ids=["mnist", "mnist-inverted", "mnist-c"])
def test_limited_mnist_builds_are_deterministic_prefixes(tmp_path: Path, build, mnist_test) -> None:
    first = build(tmp_path / "a", 40)
    assert build(tmp_path / "b", 40).content_hash() == first.content_hash()
    build(tmp_path / "short", 15)
    long, short = _samples(tmp_path / "a"), _samples(tmp_path / "short")
    assert len(long) == 40 and long[:15] == short
    assert [s.label for s in long] == mnist_test[1][:40].tolist()
    assert long[7].key.endswith("-test-000007")


def test_mnist_c_names_its_corruption_and_cycles_all_types(tmp_path: Path) -> None:
    n = 2 * len(CORRUPTIONS)
    demo.build_mnist_c(tmp_path, limit=n)
    names = [s.meta["corruption"] for s in _samples(tmp_path)]
    assert names == list(CORRUPTIONS) * 2
    assert Manifest.load(tmp_path).metadata["corruptions"] == list(CORRUPTIONS)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_changes_the_image_and_keeps_its_format(name: str, mnist_test) -> None:
    corrupt = CORRUPTIONS[name]
    for i in range(5):
        image = mnist_test[0][i]
        out = corrupt(image, np.random.default_rng(i))
        assert out.shape == (28, 28) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - image.astype(int)).sum() > 255, f"{name} left image {i} almost unchanged"
        assert np.array_equal(out, corrupt(image, np.random.default_rng(i))), f"{name} is not a function of its rng"


def test_invert_and_colour_gives_dark_ink_on_light_paper(mnist_test) -> None:
    image = mnist_test[0][0]
    rgb = demo.invert_and_colour(image, np.random.default_rng(0))
    assert rgb.shape == (28, 28, 3) and rgb.dtype == np.uint8
    paper, ink = rgb[image == 0], rgb[image == image.max()]
    assert paper.min() >= demo._PAPER_RANGE[0] and len(np.unique(paper, axis=0)) == 1
    assert ink.size and ink.max() < demo._INK_RANGE[1]
    other = demo.invert_and_colour(image, np.random.default_rng(1))
    assert not np.array_equal(rgb, other)  # the colours vary between images


def test_upsample_sklearn_digit_keeps_polarity_and_range() -> None:
    digit = np.zeros((8, 8))
    digit[2:6, 3:5] = 16.0
    out = demo.upsample_sklearn_digit(digit)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() == 255 and out[0, 0] == 0 and out[14, 14] == 255
