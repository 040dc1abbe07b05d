"""open_clip loading, safe checkpoints, zero-shot heads and Classifier persistence."""
from __future__ import annotations

import pickle

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from robustbench_ft.models import CheckpointError, Classifier, load_clip
from robustbench_ft.models.clip import read_state_dict

CLASSES = ["cat", "dog", "bird"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("rbft-tiny-vit", "random")


def test_zeroshot_head_matches_open_clip_builder(tiny):
    zs = Classifier.zeroshot(tiny, CLASSES, TEMPLATES)
    reference = open_clip.build_zero_shot_classifier(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES)  # [D, C]
    scale = tiny.model.logit_scale.exp().item()
    torch.testing.assert_close(zs.head.weight / scale, reference.T, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(zs.head.bias) == 0


def test_zeroshot_logits_are_scaled_cosine_similarities(tiny):
    zs = Classifier.zeroshot(tiny, CLASSES, TEMPLATES)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        feats = torch.nn.functional.normalize(tiny.model.encode_image(images), dim=-1)
        text = open_clip.build_zero_shot_classifier(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES)
        expected = tiny.model.logit_scale.exp() * feats @ text
        torch.testing.assert_close(zs(images), expected, atol=1e-5, rtol=1e-5)


def test_openai_imagenet_metadata_comes_from_open_clip():
    assert len(open_clip.IMAGENET_CLASSNAMES) == 1000 and len(open_clip.OPENAI_IMAGENET_TEMPLATES) == 80


def test_classifier_save_load_round_trip(tiny, tmp_path):
    zs = Classifier.zeroshot(tiny, CLASSES, TEMPLATES, provenance={"note": "test"})
    path = zs.save(tmp_path / "clf")
    loaded = Classifier.load(path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), zs(images))
    assert loaded.info.classnames == CLASSES and loaded.info.provenance["note"] == "test"
    assert loaded.content_hash() == zs.content_hash()


def test_content_hash_changes_with_any_weight(tiny):
    zs = Classifier.zeroshot(tiny, CLASSES, TEMPLATES)
    before = zs.content_hash()
    with torch.no_grad():
        next(zs.visual.parameters()).view(-1)[0] += 1e-3
    assert zs.content_hash() != before


def test_unknown_model_suggests_closest():
    with pytest.raises(KeyError, match="Did you mean 'rbft-tiny-vit'"):
        load_clip("rbft-tiny-vt", "random")


def test_unknown_pretrained_tag_lists_tags():
    with pytest.raises(KeyError, match="neither a local checkpoint file nor a pretrained tag"):
        load_clip("ViT-B-32", "laion2b_nonexistent")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_loads(tiny, tmp_path, suffix):
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP-style wrapper
    loaded = load_clip("rbft-tiny-vit", str(path))
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_checkpoint_with_wrong_shapes_names_keys(tiny, tmp_path):
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    state["visual.conv1.weight"] = torch.zeros(3, 3)
    del state["text_projection"]
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"missing key.*text_projection.*shape mismatch.*visual\.conv1\.weight"):
        load_clip("rbft-tiny-vit", str(path))


class _Exploit:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"x": _Exploit(str(marker))}}, fh)
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
        read_state_dict(path)
    assert not marker.exists()


def test_missing_checkpoint_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip("rbft-tiny-vit", "/nonexistent/weights.safetensors")
