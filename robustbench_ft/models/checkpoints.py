"""Import fine-tuned CLIP checkpoints released by other codebases as :class:`Classifier` objects.

A checkpoint is read safely (see :func:`~robustbench_ft.models.clip.read_state_dict`: safetensors,
or ``torch.load(weights_only=True)``; a pickled module only with ``trust_pickle``) and its tensors
are recognised by layout, not by file name:

* **image encoder**: the keys under ``<prefix>visual.``, where the prefix is one of
  :data:`ENCODER_PREFIXES` (``""`` for open_clip state dicts and this harness's classifiers,
  ``model.`` for model-soups and FLYP, ``image_encoder.model.`` for the WiSE-FT codebase);
* **classification head**: a linear layer in :data:`HEAD_PREFIXES` (``classification_head.`` in
  model-soups and WiSE-FT, ``head.`` here). All of them apply it to L2-normalised image features
  with the temperature folded into the weights, the parameterisation of :class:`Classifier`;
* **no head**: a full CLIP state dict (an open_clip training checkpoint, FLYP's contrastively
  fine-tuned model). The head is then the zero-shot head built from the checkpoint's *own* text
  tower, as FLYP classifies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import open_clip
import torch

from robustbench_ft.models.classifier import Classifier, ClassifierInfo
from robustbench_ft.models.clip import (
    CheckpointError,
    LoadedCLIP,
    check_finite,
    check_state_dict,
    create_architecture,
    read_state_dict,
    resolve_device,
)
from robustbench_ft.models.hub import HubError, HubFile, fetch, is_hub
from robustbench_ft.util import file_sha256

ENCODER_PREFIXES: tuple[str, ...] = ("", "model.", "image_encoder.model.", "module.model.")
HEAD_PREFIXES: tuple[str, ...] = ("classification_head.", "head.")


def describe_layout(state: dict[str, torch.Tensor]) -> tuple[str, str | None]:
    """(encoder prefix, head prefix or None) of a state dict; CheckpointError if it fits no known layout."""
    prefixes = [p for p in ENCODER_PREFIXES if any(k.startswith(f"{p}visual.") for k in state)]
    if len(prefixes) != 1:
        found = "none" if not prefixes else f"several ({', '.join(repr(p + 'visual.') for p in prefixes)})"
        raise CheckpointError(
            f"cannot find one CLIP image encoder in the checkpoint: keys under "
            f"{', '.join(repr(p + 'visual.') for p in ENCODER_PREFIXES)} expected, found {found}. "
            f"First keys: {list(state)[:5]}. Supported: open_clip state dicts, model-soups and WiSE-FT checkpoints, "
            "classifiers saved by robustbench-ft")
    heads = [h for h in HEAD_PREFIXES if f"{h}weight" in state]
    if len(heads) > 1:
        raise CheckpointError(f"the checkpoint holds several classification heads ({heads}); keep one")
    return prefixes[0], heads[0] if heads else None


def _fetch_hub(reference: str) -> HubFile:
    """The checkpoint an hf-hub reference names, with a classifier's ``.json`` sidecar fetched beside it."""
    checkpoint = fetch(reference)
    if checkpoint.path.suffix == ".safetensors":
        try:
            fetch(checkpoint.ref, str(Path(checkpoint.ref.filename or checkpoint.path.name).with_suffix(".json")))
        except HubError:
            pass  # not a classifier saved by this harness: read as a state dict
    return checkpoint


def import_checkpoint(path: str | Path, model: str, classnames: Sequence[str], templates: Sequence[str], *,
                      trust_pickle: bool = False, device: str | torch.device = "cpu") -> Classifier:
    """A :class:`Classifier` for ``classnames`` from a fine-tuned checkpoint of the architecture ``model``.

    A classifier saved by this harness (with its JSON sidecar) is loaded as it is. Otherwise the
    image encoder must match ``model`` exactly (the first mismatching keys are named), a head must
    have one row per class, and a checkpoint without a head must hold the text tower. ``path`` may be
    an ``hf-hub:ORG/REPO[@REVISION][/FILE]`` reference (:mod:`robustbench_ft.models.hub`), fetched into
    the hub cache first (a ``.safetensors`` FILE with its ``.json`` sidecar beside it on the hub is a
    saved classifier).
    """
    hub_file = _fetch_hub(path) if is_hub(path) else None
    path = hub_file.path if hub_file is not None else Path(path)
    if path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
        classifier = Classifier.load(path, device=device, expected_model=model)
        if hub_file is not None:
            classifier.info.provenance["hf_hub"] = hub_file.provenance()
        return classifier
    state = read_state_dict(path, trust_pickle=trust_pickle)
    encoder_prefix, head_prefix = describe_layout(state)
    clip_net, _, preprocess_eval = create_architecture(model)
    visual = {k[len(encoder_prefix) + len("visual."):]: v for k, v in state.items()
              if k.startswith(f"{encoder_prefix}visual.")}
    check_state_dict(clip_net.visual.state_dict(), visual, f"{path} (image encoder)")
    digest = hub_file.sha256 if hub_file is not None else file_sha256(path)
    provenance = {"imported_from": str(hub_file.ref) if hub_file is not None else str(path), "sha256": digest,
                  "layout": {"encoder": f"{encoder_prefix}visual.", "head": head_prefix or "zero-shot from its text tower"}}
    if hub_file is not None:
        provenance["hf_hub"] = hub_file.provenance()
    dev = resolve_device(device)
    if head_prefix is None:
        tower = {k[len(encoder_prefix):]: v for k, v in state.items() if k.startswith(encoder_prefix)}
        check_state_dict(clip_net.state_dict(), tower, f"{path} (a CLIP state dict without a classification head)")
        clip_net.load_state_dict(tower)
        clip = LoadedCLIP(model, str(path), clip_net.to(dev).eval(), preprocess_eval, preprocess_eval,
                          open_clip.get_tokenizer(model), dev)
        return Classifier.zeroshot(clip, classnames, templates, provenance).eval()
    weight, bias = state[f"{head_prefix}weight"], state.get(f"{head_prefix}bias")
    width = getattr(clip_net.visual, "output_dim", None)
    if weight.ndim != 2 or weight.shape[0] != len(classnames) or (width is not None and weight.shape[1] != width):
        raise CheckpointError(
            f"{path}: classification head {head_prefix}weight has shape {tuple(weight.shape)}, but the suite has "
            f"{len(classnames)} classes{f' and the encoder {width} features' if width else ''}; import it for the "
            "label space it was trained on (--suite)")
    clip_net.visual.load_state_dict(visual)
    info = ClassifierInfo(model, list(classnames), list(templates), provenance)
    classifier = Classifier(clip_net.visual, weight.float(), info)
    if bias is not None:
        with torch.no_grad():
            classifier.head.bias.copy_(bias)
    check_finite(classifier.state_dict(), f"{path} (as a classifier)")  # the head is read apart from the encoder
    return classifier.to(dev).eval()

