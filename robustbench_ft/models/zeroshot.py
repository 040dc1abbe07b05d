"""Zero-shot classification heads from class names and prompt templates (Radford et al. 2021)."""
from __future__ import annotations

from typing import Callable, Sequence

import open_clip
import torch


@torch.no_grad()
def zeroshot_weights(model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str],
                     templates: Sequence[str], *, classes_per_batch: int = 50) -> torch.Tensor:
    """Per-class mean of L2-normalised text embeddings over templates, renormalised: shape [C, D] (fp32).

    open_clip's ``build_zero_shot_classifier`` computes it (it returns [D, C]); this only checks the
    inputs, picks the model's device and transposes.
    """
    if not classnames or not templates:
        raise ValueError("zero-shot head needs at least one class name and one template")
    device = next(model.parameters()).device
    weights = open_clip.build_zero_shot_classifier(model, tokenizer, list(classnames), list(templates),
                                                   num_classes_per_batch=classes_per_batch, device=device)
    return weights.T.float().contiguous()
