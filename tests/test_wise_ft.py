"""WiSE-FT: endpoints, the linear-classifier identity, alpha parsing."""
from __future__ import annotations

import copy

import pytest
import torch

from robustbench_ft.methods import parse_alphas
from robustbench_ft.models import Classifier, load_clip
from robustbench_ft.models.classifier import interpolate


@pytest.fixture(scope="module")
def endpoints():
    torch.manual_seed(0)
    clip = load_clip("rbft-tiny-vit", "random")
    zs = Classifier.zeroshot(clip, ["a", "b", "c", "d"], ["{}"])
    ft = copy.deepcopy(zs)
    with torch.no_grad():  # a "fine-tuned" model: every tensor moved
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return zs, ft


def _logits(model, images):
    with torch.no_grad():
        return model(images)


def test_alpha_endpoints_reproduce_zeroshot_and_finetuned(endpoints):
    zs, ft = endpoints
    images = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(_logits(interpolate(zs, ft, 0.0), images), _logits(zs, images))
    torch.testing.assert_close(_logits(interpolate(zs, ft, 1.0), images), _logits(ft, images))


def test_interpolation_mixes_every_tensor(endpoints):
    zs, ft = endpoints
    mid = interpolate(zs, ft, 0.25).state_dict()
    for k, v in zs.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(mid[k], 0.75 * v + 0.25 * ft.state_dict()[k])


def test_frozen_encoder_weight_space_equals_output_space(endpoints):
    """With a shared encoder only the head differs; logits are linear in the head (WiSE-FT paper, Sec. 2)."""
    zs, _ = endpoints
    lp = copy.deepcopy(zs)
    with torch.no_grad():
        lp.head.weight.add_(torch.randn_like(lp.head.weight))
        lp.head.bias.add_(torch.randn_like(lp.head.bias))
    images = torch.randn(6, 3, 32, 32)
    for alpha in (0.0, 0.3, 0.5, 0.9, 1.0):
        weight_space = _logits(interpolate(zs, lp, alpha), images)
        output_space = (1 - alpha) * _logits(zs, images) + alpha * _logits(lp, images)
        torch.testing.assert_close(weight_space, output_space, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text,expected", [
    ("0.5", (0.5,)), (0.5, (0.5,)), ("0,0.25,0.5", (0.0, 0.25, 0.5)), ("0.5,0,0.5", (0.0, 0.5)),
    ("0:1:0.25", (0.0, 0.25, 0.5, 0.75, 1.0)), ("0:1:0.1", tuple(round(i / 10, 10) for i in range(11))),
])
def test_parse_alphas(text, expected):
    assert parse_alphas(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "0,2", "abc", "0:1:0", "nan", ""])
def test_bad_alpha_is_refused_with_a_clear_message(bad):
    with pytest.raises(ValueError, match="alpha"):
        parse_alphas(bad)


def test_interpolate_refuses_alpha_outside_unit_interval(endpoints):
    zs, ft = endpoints
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        interpolate(zs, ft, 1.2)
