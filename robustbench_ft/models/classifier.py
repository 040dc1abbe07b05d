"""Classifier: a CLIP image encoder followed by a linear head on L2-normalised features.

The head is initialised as ``logit_scale.exp() * W_zs`` (the model's own temperature folded into
the zero-shot weights), exactly the WiSE-FT parameterisation: logits are linear in the head, so
interpolating heads of a shared, frozen encoder equals interpolating their logits.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from robustbench_ft.models.clip import (
    CheckpointError,
    LoadedCLIP,
    check_state_dict,
    create_architecture,
    list_models,
    read_state_dict,
)
from robustbench_ft.models.zeroshot import zeroshot_weights
from robustbench_ft.util import atomic_write_bytes, atomic_write_text, file_sha256

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
        data = save(state)
        atomic_write_bytes(weights, data)
        sidecar = {"format": SIDECAR_FORMAT, "version": 1, "num_classes": self.num_classes,
                   "sha256": hashlib.sha256(data).hexdigest(), **asdict(self.info)}
        atomic_write_text(weights.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
        return weights

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", *,
             expected_model: str | None = None) -> "Classifier":
        """Load a classifier saved by :meth:`save` (``.safetensors`` + ``.json`` sidecar).

        ``expected_model``: the architecture the caller runs; a sidecar naming another is refused before
        anything is built (a 2 KB sidecar must not make the harness build a huge model). Every tensor
        must be finite.
        """
        weights = Path(path).with_suffix(".safetensors")
        sidecar = weights.with_suffix(".json")
        if not sidecar.is_file():
            raise FileNotFoundError(f"{sidecar} is missing: a saved classifier is a .safetensors file plus its "
                                    "JSON sidecar (model name, class names)")
        meta = _read_sidecar(sidecar)
        if expected_model is not None and meta["model"] != expected_model:
            raise CheckpointError(f"{weights} is a {meta['model'][:80]!r} classifier (its sidecar says so), but this "
                                  f"run uses --model {expected_model}; pass the matching --model")
        if "sha256" in meta and file_sha256(weights) != meta["sha256"]:  # sidecars before this check have none
            raise CheckpointError(f"{weights} is not the file its sidecar describes (its sha256 changed since it was "
                                  "saved); restore it, or delete both files to recompute them")
        info = ClassifierInfo(meta["model"], meta["classnames"], meta["templates"], meta.get("provenance", {}))
        visual = create_architecture(info.model)[0].visual
        state = read_state_dict(weights)
        if "head.weight" not in state or state["head.weight"].ndim != 2:
            raise CheckpointError(f"{weights} holds no 2-D 'head.weight': not a classifier saved by robustbench-ft")
        model = cls(visual, torch.zeros(meta["num_classes"], state["head.weight"].shape[1]), info)
        check_state_dict(model.state_dict(), state, str(weights))
        model.load_state_dict(state)
        return model.to(device).eval()

    def content_hash(self) -> str:
        """sha256 over every tensor (names, shapes, bytes): keys the logits cache."""
        return state_hash(self)


def _read_sidecar(sidecar: Path) -> dict[str, Any]:
    """The sidecar's fields, type-checked: a classifier file may come from anyone (``--finetuned``)."""
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{sidecar}: not a JSON classifier sidecar ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{sidecar} is not a robustbench-ft classifier sidecar")
    strings = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
    if not (isinstance(meta.get("model"), str) and strings(meta.get("classnames")) and strings(meta.get("templates"))
            and isinstance(meta.get("num_classes"), int) and 0 < meta["num_classes"] <= 1_000_000
            and isinstance(meta.get("provenance", {}), dict)
            and isinstance(meta.get("sha256", ""), str)):
        raise CheckpointError(f"{sidecar}: needs 'model' (string), 'classnames' and 'templates' (lists of strings), "
                              f"'num_classes' (a positive integer) and optionally 'provenance' (an object)")
    if meta["model"] not in list_models():
        raise CheckpointError(f"{sidecar}: unknown model {meta['model'][:80]!r} (`robustbench-ft list models`)")
    return meta


def state_hash(module: torch.nn.Module) -> str:
    """sha256 over every tensor of a module's state dict (names, shapes, dtypes, bytes).

    Keys caches by content rather than by where weights came from: the same encoder loaded from a
    file or built in memory hashes the same, and a changed tensor never reuses a stale cache entry.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def same_encoder(a: Classifier, b: Classifier) -> bool:
    """Whether two classifiers have the same image encoder: the same module, or equal tensors."""
    if a.visual is b.visual:
        return True
    sa, sb = a.visual.state_dict(), b.visual.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def average(classifiers: Sequence[Classifier], weights: Sequence[float]) -> Classifier:
    """Σ_i w_i·θ_i over every floating tensor of classifiers of one architecture and label space.

    The weight-space ensembles of WiSE-FT (two classifiers) and model soups (many). Non-floating
    tensors (e.g. batch-norm step counters) are taken from the last classifier. When every
    classifier has the same image encoder (linear heads on one frozen encoder), the result keeps
    that encoder *module* and only the heads are mixed: evaluation then computes the features once
    for all of them (see :func:`robustbench_ft.evaluation.evaluate`), and the encoder is not copied
    (so train a deep copy of such a result, as :func:`~robustbench_ft.methods.finetune.finetune_classifier` does).
    """
    if not classifiers or len(classifiers) != len(weights):
        raise ValueError(f"average() needs one weight per classifier; got {len(classifiers)} classifier(s) "
                         f"and {len(weights)} weight(s)")
    first = classifiers[0]
    states = [c.state_dict() for c in classifiers]
    for i, state in enumerate(states[1:], start=1):
        check_state_dict(states[0], state, f"classifier {i} of the average")

    def mix(key: str) -> torch.Tensor:
        if not states[0][key].is_floating_point():
            return states[-1][key]
        return sum(w * s[key] for w, s in zip(weights, states))  # type: ignore[return-value]

    if all(same_encoder(first, c) for c in classifiers[1:]):
        out = Classifier(first.visual, mix("head.weight"), copy.deepcopy(first.info)).to(first.head.weight.device)
        with torch.no_grad():
            out.head.bias.copy_(mix("head.bias"))
        return out
    out = copy.deepcopy(first)
    out.load_state_dict({k: mix(k) for k in states[0]})
    return out


def interpolate(zeroshot: Classifier, finetuned: Classifier, alpha: float) -> Classifier:
    """WiSE-FT: θ_α = (1−α)·θ_zs + α·θ_ft over every floating tensor of the classifier (see :func:`average`)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = average([zeroshot, finetuned], [1.0 - alpha, alpha])
    out.info = replace(zeroshot.info, provenance={**finetuned.info.provenance, "wise_ft_alpha": alpha})
    return out
