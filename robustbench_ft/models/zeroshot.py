"""Zero-shot classification heads from class names and prompt templates (Radford et al. 2021).

A template is a format string: ``{}`` is the class name as the dataset writes it, and
``{article_name}`` the name with underscores read as spaces after "a" or "an" (wise-ft's
``append_proper_article``, which its FMoW prompts use beside templates that keep the raw name).
"""
from __future__ import annotations

from typing import Callable, Sequence

import open_clip
import torch


def article_name(classname: str) -> str:
    """wise-ft's ``append_proper_article`` (src/templates/utils.py @ 58b7a4b): underscores to spaces,
    then "an " before a name starting with a lower-case vowel, else "a "."""
    name = classname.replace("_", " ")
    return ("an " if name[:1] in tuple("aeiou") else "a ") + name


def fill_template(template: str, classname: str) -> str:
    """A prompt: ``template`` with ``{}`` the class name and ``{article_name}`` its :func:`article_name`."""
    return template.format(classname, article_name=article_name(classname))


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
    fills = [lambda c, t=t: fill_template(t, c) for t in templates]
    weights = open_clip.build_zero_shot_classifier(model, tokenizer, list(classnames), fills,
                                                   num_classes_per_batch=classes_per_batch, device=device)
    return weights.T.float().contiguous()
