"""Importing fine-tuned checkpoints from other codebases (open_clip, model-soups, WiSE-FT) as classifiers."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from robustbench_ft import RunConfig, run
from robustbench_ft.cli import main
from robustbench_ft.models.checkpoints import import_checkpoint
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.models.clip import CheckpointError, create_architecture, load_clip
from robustbench_ft.models.zeroshot import zeroshot_weights

MODEL = "rbft-tiny-vit"
CLASSES = ["red", "green", "blue"]
TEMPLATES = ["a photo of a {}.", "a {} thing."]


class WiseFTStyleClassifier(torch.nn.Module):
    """The module layout of the WiSE-FT codebase's ImageClassifier (image_encoder.model + classification_head)."""

    def __init__(self, clip: torch.nn.Module, head: torch.Tensor):
        super().__init__()
        self.image_encoder = torch.nn.Module()
        self.image_encoder.model = clip
        self.classification_head = torch.nn.Linear(head.shape[1], head.shape[0])
        with torch.no_grad():
            self.classification_head.weight.copy_(head)


@pytest.fixture(scope="module")
def finetuned():
    """A "fine-tuned" tiny CLIP (random weights, seeded) and a head for three classes."""
    torch.manual_seed(3)
    net = create_architecture(MODEL)[0].eval()
    head = torch.randn(len(CLASSES), net.visual.output_dim)
    bias = torch.randn(len(CLASSES))
    return net, head, bias


def _expected_logits(net, head, bias, images):
    with torch.no_grad():
        return F.normalize(net.encode_image(images), dim=-1) @ head.T + bias


def _images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layout", ["model-soups", "wise-ft"])
def test_checkpoints_with_a_classification_head_give_the_same_logits(tmp_path, finetuned, layout):
    net, head, bias = finetuned
    if layout == "model-soups":  # ModelWrapper: model (CLIP, text transformer deleted) + classification_head
        state = {f"model.{k}": v for k, v in net.state_dict().items() if not k.startswith("transformer.")}
    else:
        state = {f"image_encoder.model.{k}": v for k, v in net.state_dict().items()}
    state |= {"classification_head.weight": head, "classification_head.bias": bias}
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state}, path)
    clf = import_checkpoint(path, MODEL, CLASSES, TEMPLATES)
    images = _images()
    with torch.no_grad():
        assert torch.allclose(clf(images), _expected_logits(net, head, bias, images), atol=1e-5)
    assert clf.info.provenance["layout"]["head"] == "classification_head."


def test_full_clip_state_dict_gets_the_zero_shot_head_of_its_own_text_tower(tmp_path, finetuned):
    net, _, _ = finetuned
    path = tmp_path / "epoch_3.pt"  # an open_clip training checkpoint: DDP prefix, epoch and name fields
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    clf = import_checkpoint(path, MODEL, CLASSES, TEMPLATES)
    tokenizer = load_clip(MODEL, "random").tokenizer
    expected = net.logit_scale.exp() * zeroshot_weights(net, tokenizer, CLASSES, TEMPLATES)
    assert torch.allclose(clf.head.weight, expected, atol=1e-6)
    images = _images()
    with torch.no_grad():
        assert torch.allclose(clf.features(images), F.normalize(net.encode_image(images), dim=-1), atol=1e-6)


def test_pickled_module_needs_trust_and_then_imports(tmp_path, finetuned):
    net, head, bias = finetuned
    module = WiseFTStyleClassifier(net, head)
    with torch.no_grad():
        module.classification_head.bias.copy_(bias)
    path = tmp_path / "finetuned.pt"
    torch.save(module, path)  # how the WiSE-FT codebase saves: the whole module, pickled
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        import_checkpoint(path, MODEL, CLASSES, TEMPLATES)
    clf = import_checkpoint(path, MODEL, CLASSES, TEMPLATES, trust_pickle=True)
    images = _images()
    with torch.no_grad():
        assert torch.allclose(clf(images), _expected_logits(net, head, bias, images), atol=1e-5)


def test_bad_checkpoints_are_refused_with_the_reason(tmp_path, finetuned):
    net, head, _ = finetuned
    no_encoder = tmp_path / "a.safetensors"
    save_file({"backbone.conv.weight": torch.zeros(2, 2)}, str(no_encoder))
    with pytest.raises(CheckpointError, match=r"cannot find one CLIP image encoder.*backbone\.conv\.weight"):
        import_checkpoint(no_encoder, MODEL, CLASSES, TEMPLATES)

    wrong_classes = tmp_path / "b.safetensors"
    save_file({**{f"model.{k}": v.contiguous() for k, v in net.state_dict().items()},
               "classification_head.weight": torch.zeros(5, head.shape[1])}, str(wrong_classes))
    with pytest.raises(CheckpointError, match=r"shape \(5, \d+\), but the suite has 3 classes"):
        import_checkpoint(wrong_classes, MODEL, CLASSES, TEMPLATES)

    other_arch = tmp_path / "c.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in create_architecture("rbft-tiny-rn")[0].visual.state_dict().items()},
              str(other_arch))
    with pytest.raises(CheckpointError, match=r"image encoder\) does not match the model architecture"):
        import_checkpoint(other_arch, MODEL, CLASSES, TEMPLATES)

    encoder_only = tmp_path / "d.safetensors"  # neither head nor text tower: nothing to classify with
    save_file({f"visual.{k}": v.contiguous() for k, v in net.visual.state_dict().items()}, str(encoder_only))
    with pytest.raises(CheckpointError, match="without a classification head.*missing key"):
        import_checkpoint(encoder_only, MODEL, CLASSES, TEMPLATES)


def test_import_checkpoint_cli_then_wise_ft_run_uses_it(tmp_path, run_dirs, capsys):
    from robustbench_ft.datasets.registry import get_dataset

    ref = get_dataset("synth")
    torch.manual_seed(5)
    net = create_architecture(MODEL)[0]
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    state |= {"classification_head.weight": torch.randn(len(ref.classnames), net.visual.output_dim),
              "classification_head.bias": torch.zeros(len(ref.classnames))}
    src = tmp_path / "soup-ingredient.pt"
    torch.save(state, src)
    out = tmp_path / "imported"
    assert main(["import-checkpoint", str(src), str(out), "--model", MODEL, "--suite", "synthetic"]) == 0
    said = capsys.readouterr().out
    assert "model.visual." in said and "--finetuned" in said
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["classnames"] == list(ref.classnames) and sidecar["provenance"]["imported_from"] == str(src)

    config = RunConfig(method="wise-ft", model=MODEL, pretrained="random", suite="synthetic", report=False,
                       method_options={"alpha": "0.5", "finetuned": str(src)}, **run_dirs)  # the raw file works too
    records = run(config, progress=False, log=lambda m: None).records
    loaded = Classifier.load(out.with_suffix(".safetensors"))
    assert [r.candidate for r in records] == ["zeroshot", "finetuned", "wise-ft α=0.50", "wise-ft α chosen on val"]
    assert loaded.content_hash() == import_checkpoint(src, MODEL, ref.classnames, ref.templates).content_hash()

    assert main(["import-checkpoint", str(tmp_path / "missing.pt"), str(out), "--model", MODEL]) == 2
    assert "does not exist" in capsys.readouterr().err
