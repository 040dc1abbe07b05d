"""Classifier: a CLIP image encoder followed by a linear head on L2-normalised features.

The head is initialised as ``logit_scale.exp() * W_zs`` (the model's own temperature folded into
the zero-shot weights), exactly the WiSE-FT parameterisation: logits are linear in the head, so
interpolating heads of a shared, frozen encoder equals interpolating their logits.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from robustbench_ft.models.clip import LoadedCLIP, check_state_dict, create_architecture, read_state_dict
from robustbench_ft.models.zeroshot import zeroshot_weights
from robustbench_ft.results import atomic_write_bytes, atomic_write_text

SIDECAR_FORMAT = "robustbench-ft-classifier"


@dataclass
class ClassifierInfo:
    """What a classifier is: its architecture, label space and where it came from (the JSON sidecar)."""

    model: str
    classnames: list[str]
    templates: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)


class Classifier(torch.nn.Module):
    def __init__(self, visual: torch.nn.Module, head: torch.Tensor, info: ClassifierInfo):
        super().__init__()
        self.visual = visual
        self.head = torch.nn.Linear(head.shape[1], head.shape[0], bias=True)
        with torch.no_grad():
            self.head.weight.copy_(head)
            self.head.bias.zero_()
        self.info = info

    @classmethod
    def zeroshot(cls, clip: LoadedCLIP, classnames: Sequence[str], templates: Sequence[str],
                 provenance: dict[str, Any] | None = None) -> "Classifier":
        """The zero-shot classifier of a CLIP model; the image encoder is a copy (the CLIP model stays intact)."""
        import copy

        weights = zeroshot_weights(clip.model, clip.tokenizer, list(classnames), list(templates))
        scale = clip.model.logit_scale.exp().item()
        info = ClassifierInfo(clip.name, list(classnames), list(templates),
                              {"pretrained": clip.pretrained, **(provenance or {})})
        return cls(copy.deepcopy(clip.model.visual), scale * weights, info).to(clip.device)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    # --- persistence -------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json`` (both atomically). Returns the weights path."""
        from safetensors.torch import save

        weights = Path(path).with_suffix(".safetensors")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(weights, save(state))
        sidecar = {"format": SIDECAR_FORMAT, "version": 1, "num_classes": self.num_classes, **asdict(self.info)}
        atomic_write_text(weights.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
        return weights

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Classifier":
        """Load a classifier saved by :meth:`save` (``.safetensors`` + ``.json`` sidecar)."""
        weights = Path(path).with_suffix(".safetensors")
        sidecar = weights.with_suffix(".json")
        if not sidecar.is_file():
            raise FileNotFoundError(f"{sidecar} is missing: a saved classifier is a .safetensors file plus its "
                                    "JSON sidecar (model name, class names)")
        meta = json.loads(sidecar.read_text())
        if meta.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"{sidecar} is not a robustbench-ft classifier sidecar")
        info = ClassifierInfo(meta["model"], meta["classnames"], meta["templates"], meta.get("provenance", {}))
        visual = create_architecture(info.model)[0].visual
        state = read_state_dict(weights)
        model = cls(visual, torch.zeros(meta["num_classes"], state["head.weight"].shape[1]), info)
        check_state_dict(model.state_dict(), state, str(weights))
        model.load_state_dict(state)
        return model.to(device).eval()

    def content_hash(self) -> str:
        """sha256 over every tensor (names, shapes, bytes): keys the logits cache."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


def interpolate(zeroshot: Classifier, finetuned: Classifier, alpha: float) -> Classifier:
    """WiSE-FT: θ_α = (1−α)·θ_zs + α·θ_ft over every floating tensor of the classifier."""
    import copy

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    zs, ft = zeroshot.state_dict(), finetuned.state_dict()
    check_state_dict(zs, ft, "the fine-tuned classifier")
    mixed = {k: ((1 - alpha) * zs[k] + alpha * ft[k]) if zs[k].is_floating_point() else ft[k] for k in zs}
    out = copy.deepcopy(zeroshot)
    out.load_state_dict(mixed)
    out.info = ClassifierInfo(zeroshot.info.model, zeroshot.info.classnames, zeroshot.info.templates,
                              {**finetuned.info.provenance, "wise_ft_alpha": alpha})
    return out
