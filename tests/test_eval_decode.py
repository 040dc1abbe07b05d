"""The fast CPU decode path and the device (GPU) decode path against open_clip's PIL preprocessing.

The device path is exercised with ``device="cpu"``: the same code, with torchvision's CPU JPEG
decoder instead of nvJPEG (no GPU in CI).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustbench_ft.evaluation.dataset_pass import evaluate
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.evaluation.pipeline import eval_pipeline
from robustbench_ft.loading.eval_decode import CPUDecoder, parse_eval_transform, resize_crop
from robustbench_ft.loading.gpu_decode import DeviceDecoder
from robustbench_ft.loading.shard_dataset import decode_image
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.models.clip import create_architecture, load_clip
from robustbench_ft.shards.manifest import ShardError
from robustbench_ft.shards.writer import write_shards


def textured(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth colour blobs plus fine noise: photo-like enough that resampling differences show."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, size=(height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8))
    smooth = np.asarray(base.resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
    noisy = (smooth + rng.integers(-25, 26, size=smooth.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(noisy).convert(mode)


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def preprocess():
    """open_clip's eval transform of a standard model at 224 px (the architecture is built, never run)."""
    return create_architecture("ViT-B-32")[2]


def reference_pixels(preprocess, data: bytes) -> torch.Tensor:
    """The reference output mapped back to 0..255 pixel levels, for comparisons in grey levels."""
    spec = parse_eval_transform(preprocess)
    out = preprocess(decode_image(data, Path("x"), "k"))
    return out * torch.tensor(spec.std).view(3, 1, 1) * 255 + torch.tensor(spec.mean).view(3, 1, 1) * 255


def test_parse_maps_open_clip_eval_transform(preprocess):
    spec = parse_eval_transform(preprocess)
    assert spec is not None and spec.resize == 224 and spec.crop == (224, 224) and spec.interpolation == "bicubic"
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_unmappable_transforms_fall_back_to_the_reference(preprocess):
    import open_clip

    squash = open_clip.image_transform(224, is_train=False, resize_mode="squash")
    assert parse_eval_transform(squash) is None
    assert parse_eval_transform(lambda image: image) is None
    assert eval_pipeline(squash, "cpu", "jpg").name == "reference"
    with pytest.raises(ValueError, match="cannot map"):
        eval_pipeline(squash, "cpu", "jpg", decode="fast")
    with pytest.raises(ValueError, match="not JPEG"):
        eval_pipeline(preprocess, "cpu", "png", decode="device")
    assert eval_pipeline(preprocess, "cpu", "jpg").name == "fast"  # auto on CPU: the fast CPU path


@pytest.mark.parametrize("size,mode", [((500, 375), "RGB"), ((375, 500), "RGB"), ((333, 500), "L"),
                                       ((224, 224), "RGB"), ((300, 200), "RGB")])
def test_fast_decode_is_within_one_grey_level_of_the_reference(preprocess, size, mode):
    spec = parse_eval_transform(preprocess)
    data = jpeg(textured(*size, seed=size[0], mode=mode))
    fast = CPUDecoder(spec)(data, Path("x"), "k")
    assert fast.dtype == torch.uint8 and fast.shape == (3, 224, 224)
    diff = (reference_pixels(preprocess, data) - fast.float()).abs()
    assert diff.max() <= 1.0 + 1e-3 and diff.mean() < 0.02
    # normalisation of the uint8 batch is ToTensor + Normalize exactly: equal pixels, equal floats
    ref_from_fast = preprocess.transforms[-1](fast.float().div(255))
    torch.testing.assert_close(spec.normalize(fast[None])[0], ref_from_fast, rtol=0, atol=0)


def test_draft_decode_keeps_the_output_geometry_and_stays_close(preprocess):
    spec = parse_eval_transform(preprocess).with_draft(1.0)
    data = jpeg(textured(1000, 750, seed=3))
    decoder = CPUDecoder(spec)
    assert decoder.draft_size(1000, 750) is not None
    drafted = decoder(data, Path("x"), "k")
    diff = (reference_pixels(preprocess, data) - drafted.float()).abs()
    assert drafted.shape == (3, 224, 224) and diff.mean() < 2.0 and diff.max() <= 16
    assert CPUDecoder(parse_eval_transform(preprocess)).draft_size(1000, 750) is None  # off unless asked for
    with pytest.raises(ValueError, match="draft_factor"):
        spec.with_draft(0.5)


def test_fast_decode_names_a_corrupt_sample(preprocess):
    with pytest.raises(ShardError, match="sample 'bad'"):
        CPUDecoder(parse_eval_transform(preprocess))(b"\xff\xd8\xffnot a jpeg", Path("s.tar"), "bad")


def test_device_decoder_on_cpu_matches_the_fast_path(preprocess):
    spec = parse_eval_transform(preprocess)
    datas = [jpeg(textured(w, h, seed=i)) for i, (w, h) in enumerate([(500, 375), (500, 375), (375, 500), (240, 320)])]
    datas.append(jpeg(textured(500, 375, seed=9, mode="CMYK")))  # not decodable by every JPEG path: falls back
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    batch = DeviceDecoder(spec, "cpu")(encoded)
    assert batch.shape == (5, 3, 224, 224) and batch.is_contiguous(memory_format=torch.channels_last)
    fast = spec.normalize(torch.stack([CPUDecoder(spec)(d, Path("x"), "k") for d in datas]))
    level = 1 / 255 / min(spec.std)  # one grey level in normalised units
    assert (batch[:4] - fast[:4]).abs().max() <= level + 1e-5
    reference = torch.stack([preprocess(decode_image(d, Path("x"), "k")) for d in datas])
    assert (batch[4] - reference[4]).abs().mean() < 3 * level  # CMYK conversion may differ a little from PIL's


def test_device_decoder_names_a_corrupt_sample(preprocess):
    decoder = DeviceDecoder(parse_eval_transform(preprocess), "cpu", "some/set")
    good = torch.frombuffer(bytearray(jpeg(textured(64, 48, seed=1))), dtype=torch.uint8)
    with pytest.raises(ShardError, match="sample #7"):
        decoder([good, torch.zeros(10, dtype=torch.uint8)], [6, 7])


def test_resize_crop_batches_equal_sizes(preprocess):
    spec = parse_eval_transform(preprocess)
    images = torch.randint(0, 256, (2, 3, 300, 400), dtype=torch.uint8)
    both = resize_crop(images, spec)
    torch.testing.assert_close(both[1], resize_crop(images[1], spec), rtol=0, atol=0)


def test_top1_is_unchanged_by_the_fast_and_device_paths(tmp_path):
    """End to end through evaluate(): every decode path gives (nearly) the reference's predictions."""
    torch.manual_seed(0)
    clip = load_clip("rbft-tiny-vit", "random")
    model = Classifier.zeroshot(clip, ["a", "b", "c"], ["{}"])
    images = ((f"s{i:02d}", textured(96, 72, seed=i), i % 3, None) for i in range(30))
    write_shards(images, tmp_path / "set", "set", ["a", "b", "c"], samples_per_shard=10, image_format="jpg")
    preds = {mode: evaluate({"m": model}, tmp_path / "set", clip.preprocess_eval, EvalOptions(batch_size=16, progress=False, decode=mode)) for mode in ("reference", "fast", "device")}
    ref = preds["reference"].logits["m"]
    for mode in ("fast", "device"):
        got = preds[mode].logits["m"]
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
        agree = (got.argmax(1) == ref.argmax(1)).mean()
        assert agree >= 0.9, f"{mode}: top-1 agrees on {agree:.0%} of the images"
        assert abs(preds[mode].top1("m") - preds["reference"].top1("m")) <= 0.1
