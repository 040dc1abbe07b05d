"""The demo model's pretraining: renderer, captions, the soft-target CLIP loss, and a tiny end-to-end run."""
from __future__ import annotations

import importlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from robustbench_ft.demo.digits import DIGIT_CLASSNAMES
from robustbench_ft.demo.fonts import HELDOUT_FONTS, PRETRAIN_FONTS, font_paths
from robustbench_ft.demo.render import make_caption, render_digit, sample_colours, sample_rendering
from robustbench_ft.models import load_clip
from robustbench_ft.zoo import PretrainDemoConfig, pretrain_demo
from robustbench_ft.zoo.pretrain_demo import soft_clip_loss

# the package re-exports the function pretrain_demo, which hides the submodule of the same name
pretrain_module = importlib.import_module("robustbench_ft.zoo.pretrain_demo")

FONT = font_paths(PRETRAIN_FONTS)[0]


@pytest.mark.parametrize("font", [FONT, None], ids=["font", "stroke"])
@pytest.mark.parametrize("style", ["random", "plain"])
def test_render_is_deterministic_rgb_of_requested_size(font, style):
    a = render_digit(3, font, np.random.default_rng(7), size=28, style=style)
    b = render_digit(3, font, np.random.default_rng(7), size=28, style=style)
    assert a.mode == "RGB" and a.size == (28, 28)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert render_digit(3, font, np.random.default_rng(7), size=32, style=style).size == (32, 32)


def test_plain_style_is_dark_centred_ink_on_white():
    img = np.asarray(render_digit(8, font_paths(HELDOUT_FONTS)[0], np.random.default_rng(0), style="plain"))
    gray = img.mean(axis=2)
    assert gray[0].min() > 240 and gray[:, 0].min() > 240  # white border
    assert gray.min() < 60  # black ink
    ys, xs = np.nonzero(gray < 128)
    assert abs(ys.mean() - 13.5) < 2.5 and abs(xs.mean() - 13.5) < 2.5


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError, match="style"):
        render_digit(1, FONT, np.random.default_rng(0), style="fancy")
    with pytest.raises(ValueError, match="digit"):
        render_digit(10, FONT, np.random.default_rng(0))


def test_colours_cover_both_polarities():
    rng = np.random.default_rng(0)
    pairs = [sample_colours(rng) for _ in range(200)]
    assert any(p["fg"] == "white" and p["bg"] == "black" for p in pairs)
    assert any(p["fg"] == "black" and p["bg"] == "white" for p in pairs)


@pytest.mark.parametrize("digit", range(10))
def test_caption_names_the_digit(digit):
    rng = np.random.default_rng(digit)
    for _ in range(20):
        r = sample_rendering(digit, None if rng.random() < 0.5 else FONT, rng)
        caption = make_caption(digit, dict(r.attributes, **sample_colours(rng)), rng)
        words = caption.lower().replace(".", " ").replace(",", " ").split()
        named = [w for w in words if w in DIGIT_CLASSNAMES or (w.isdigit() and len(w) == 1)]
        assert named in ([DIGIT_CLASSNAMES[digit]], [str(digit)]), caption


def test_soft_loss_equals_clip_loss_when_labels_are_distinct():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 8), dim=-1)
    txt = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    target = torch.arange(6)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(soft_clip_loss(img, txt, torch.arange(6), scale), clip)


def test_soft_loss_does_not_care_which_same_digit_caption_an_image_is_paired_with():
    # captions of the same digit are interchangeable positives: permuting texts within a class leaves
    # the loss unchanged (plain CLIP would penalise the permutation)
    torch.manual_seed(1)
    img = F.normalize(torch.randn(5, 8), dim=-1)
    txt = F.normalize(torch.randn(5, 8), dim=-1)
    labels = torch.tensor([2, 7, 2, 7, 4])
    perm = torch.tensor([2, 3, 0, 1, 4])  # swaps the two 2s and the two 7s
    scale = torch.tensor(5.0)
    assert torch.allclose(soft_clip_loss(img, txt, labels, scale), soft_clip_loss(img, txt[perm], labels, scale))
    assert not torch.allclose(soft_clip_loss(img, txt, torch.arange(5), scale),
                              soft_clip_loss(img, txt[perm], torch.arange(5), scale))


def test_tiny_pretrain_writes_loadable_checkpoint_and_sidecar(tmp_path, monkeypatch):
    # a few fake "MNIST" images stand in for the 70k real ones: reading those takes seconds
    fake = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    monkeypatch.setattr(pretrain_module, "load_mnist", lambda: {"test": (fake, np.arange(20) % 10)})
    config = replace(PretrainDemoConfig(), model="rbft-tiny-vit", corpus_size=64, steps=3, batch_size=16,
                     warmup_steps=1, render_workers=1, eval_images=20, threads=1)
    summary = pretrain_demo(config, tmp_path / "tiny", progress=False)
    weights, sidecar = tmp_path / "tiny.safetensors", tmp_path / "tiny.json"
    assert weights.is_file() and sidecar.is_file()
    assert not list(tmp_path.glob("*.tmp"))
    meta = json.loads(sidecar.read_text())
    assert meta == summary
    assert meta["seed"] == 0 and meta["steps"] == 3 and meta["config"]["model"] == "rbft-tiny-vit"
    assert set(meta["zero_shot_accuracy"]) == {"mnist_test", "mnist_test_inverted", "sklearn_digits"}
    assert all(0.0 <= v <= 1.0 for v in meta["zero_shot_accuracy"].values())
    loaded = load_clip("rbft-tiny-vit", str(weights))
    state = load_file(str(weights))
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())


def test_pretrain_is_deterministic_given_the_seed(tmp_path):
    config = replace(PretrainDemoConfig(), model="rbft-tiny-vit", corpus_size=32, steps=2, batch_size=16,
                     warmup_steps=1, render_workers=1, eval_images=0, threads=1)
    pretrain_demo(config, tmp_path / "a", progress=False)
    pretrain_demo(config, tmp_path / "b.safetensors", progress=False)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
