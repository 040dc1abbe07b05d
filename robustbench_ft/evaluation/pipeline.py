"""How one evaluation pass turns shard samples into model inputs: GPU batch decode on CUDA, the fast CPU
decoder elsewhere, open_clip's own transform when neither can map it (docs/performance.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from robustbench_ft.config import DECODE_MODES
from robustbench_ft.loading.eval_decode import CPUDecoder, parse_eval_transform, transform_id


@dataclass(frozen=True)
class EvalPipeline:
    """How one pass turns shard samples into model inputs.

    ``loader_kwargs`` go to :func:`~robustbench_ft.loading.loader.make_loader` (a PIL ``transform``, or
    a bytes ``decoder`` and its ``collate_fn``); ``prepare(images, indices)`` turns a batch's images
    into the float input on the device; ``transform_id`` names the pixels produced (cache keys).
    """

    name: str                       # "device", "fast" or "reference"
    transform_id: str
    loader_kwargs: dict[str, Any]
    prepare: Callable[[Any, torch.Tensor], torch.Tensor]


def eval_pipeline(transform: Callable, device: torch.device | str, image_format: str, decode: str = "auto", *,
                  draft_factor: float | None = None, on_bad: str = "error", keep_meta: bool = False,
                  directory: str | Path = "") -> EvalPipeline:
    """The decode path of a pass over ``image_format`` shards with ``transform`` on ``device``.

    ``decode``: "device" decodes JPEG batches on the device (nvJPEG on CUDA); "fast" computes
    open_clip's eval transform with :class:`~robustbench_ft.loading.eval_decode.CPUDecoder` in the
    workers (normalising there for a CPU model, on the device otherwise); "reference" runs
    ``transform`` on PIL images;
    "auto" takes "device" on CUDA for JPEG shards, else "fast", else "reference", by what applies.
    ``draft_factor`` enables reduced-size JPEG decoding on the "fast" path (see eval_decode).
    The device path needs the error mode (``on_bad="error"``: skipped samples are tracked by workers).
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    device = torch.device(device)
    spec = parse_eval_transform(transform) if decode != "reference" else None
    if spec is None and decode in ("device", "fast"):
        raise ValueError(f"decode={decode!r} cannot map the transform {transform!r}: it needs open_clip's "
                         "Resize(int) -> CenterCrop -> RGB -> ToTensor -> Normalize; use decode='reference'")
    if spec is None:
        return EvalPipeline("reference", transform_id(transform), {"transform": transform},
                            lambda images, index: images.to(device, non_blocking=True))
    obstacle = ("the shards are not JPEG" if image_format != "jpg" else
                "on_bad='skip' needs the CPU path" if on_bad != "error" else
                "reduced-size (draft) decoding is CPU only" if draft_factor is not None else None)
    if decode == "device" and obstacle:
        raise ValueError(f"decode='device' is not possible here: {obstacle}; use decode='fast' or 'auto'")
    if decode == "device" or (decode == "auto" and device.type == "cuda" and obstacle is None):
        from robustbench_ft.loading.gpu_decode import DeviceDecoder, collate_for, encoded_bytes

        decoder = DeviceDecoder(spec, device, directory)
        return EvalPipeline("device", decoder.id, {"decoder": encoded_bytes, "collate_fn": collate_for(keep_meta)},
                            lambda images, index: decoder(images, index.tolist()))
    spec = spec.with_draft(draft_factor)
    if device.type == "cpu":  # the workers normalise too: the main process is busy with the forward pass
        return EvalPipeline("fast", spec.id, {"decoder": CPUDecoder(spec, normalize=True)},
                            lambda images, index: images)
    return EvalPipeline("fast", spec.id, {"decoder": CPUDecoder(spec)},  # uint8 to the device, a quarter of the bytes
                        lambda images, index: spec.normalize(images.to(device, non_blocking=True)))
