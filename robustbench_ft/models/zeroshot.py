"""Zero-shot classification heads from class names and prompt templates (Radford et al. 2021)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def zeroshot_weights(model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str],
                     templates: Sequence[str], *, classes_per_batch: int = 50) -> torch.Tensor:
    """Per-class mean of L2-normalised text embeddings over templates, renormalised: shape [C, D]."""
    if not classnames or not templates:
        raise ValueError("zero-shot head needs at least one class name and one template")
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(classnames), classes_per_batch):
        batch = classnames[start:start + classes_per_batch]
        texts = [t.format(c) for c in batch for t in templates]
        emb = F.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1)
        rows.append(F.normalize(emb.view(len(batch), len(templates), -1).mean(dim=1), dim=-1))
    return torch.cat(rows)
