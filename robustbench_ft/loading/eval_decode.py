"""Fast evaluation preprocessing: open_clip's eval transform, computed faster with the same result.

open_clip's eval transform is ``Resize(s, bicubic) -> CenterCrop(c) -> RGB -> ToTensor -> Normalize``
on a PIL image. Most of an evaluation pass on CPU goes into it, and half of that into PIL's bicubic
resize. :func:`parse_eval_transform` reads the parameters out of such a transform (and returns None
for anything it cannot map, so callers fall back to the transform itself), and
:class:`CPUDecoder` computes the same pixels in a cheaper order:

* decode with PIL (libjpeg-turbo, the same decoder and pixels as the reference);
* optionally let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain
  (``Image.draft``) when the scaled image is still at least ``draft_factor`` times the resize target:
  a JPEG of 4x the target's side decodes ~4x faster. It changes pixels slightly, so it is off unless
  asked for and is part of :meth:`EvalPreprocess.id` (the cache key);
* resize the uint8 image with torchvision's native uint8 bicubic kernel (antialiased, as PIL; a few
  times faster than PIL's, pixels within one grey level of it) and crop;
* normalise (:meth:`EvalPreprocess.normalize`) with the very operations of ToTensor + Normalize,
  so equal uint8 pixels give equal floats: in the worker for a CPU model, or on the device for a
  GPU model, the workers then shipping *uint8* (a quarter of the bytes).

The output size is computed from the image's original size exactly as torchvision's ``Resize``
does, so a draft-decoded image is resized to the same shape as the full-size one would be.
The GPU path (:mod:`robustbench_ft.loading.gpu_decode`) reuses :func:`resize_crop` on the device.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from torchvision.transforms.v2 import functional as F

from robustbench_ft.loading.shard_dataset import decode_image

_RGB_STEPS = ("MaybeConvertMode", "_convert_to_rgb")  # open_clip's "convert to RGB" steps (class / function names)
_INTERPOLATIONS = {InterpolationMode.BICUBIC: "bicubic", InterpolationMode.BILINEAR: "bilinear"}


@dataclass(frozen=True)
class EvalPreprocess:
    """The parameters of a shortest-side-resize + center-crop + normalise eval transform."""

    resize: int                        # shorter side after the resize
    crop: tuple[int, int]              # (height, width) of the center crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    draft_factor: float | None = None  # JPEG DCT-domain downscaling while the image stays >= factor x resize

    @property
    def id(self) -> str:
        """Identifies the pixels this preprocessing produces: part of the feature and logits cache keys."""
        return "fast-" + hashlib.sha256(repr(self).encode()).hexdigest()[:12]

    def with_draft(self, draft_factor: float | None) -> "EvalPreprocess":
        if draft_factor is not None and draft_factor < 1:
            raise ValueError(f"draft_factor must be >= 1 (the decoded image must not be smaller than the resize "
                             f"target), got {draft_factor}")
        return EvalPreprocess(self.resize, self.crop, self.mean, self.std, self.interpolation, draft_factor)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after ``Resize(resize)``, computed as torchvision computes it."""
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised floats, by ToTensor's ``/255`` and Normalize's ``(x-mean)/std``."""
        mean = torch.tensor(self.mean, dtype=dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=images.device).view(1, 3, 1, 1)
        return images.to(dtype).div_(255).sub_(mean).div_(std)


def parse_eval_transform(transform: Callable) -> EvalPreprocess | None:
    """The :class:`EvalPreprocess` equivalent to ``transform``, or None if it is not one we can map.

    Mapped: ``Compose([Resize(int, bicubic|bilinear, antialias), CenterCrop, <to RGB>, ToTensor,
    Normalize(3 channels)])``, open_clip's eval transform for its default "shortest" resize mode.
    Anything else (``ResizeKeepRatio``, "squash", extra steps) gives None: the caller then runs the
    transform itself, on PIL images.
    """
    if not isinstance(transform, Compose):
        return None
    steps = list(transform.transforms)
    if len(steps) != 5:
        return None
    resize, crop, rgb, to_tensor, normalize = steps
    if not (type(resize) is Resize and isinstance(crop, CenterCrop) and isinstance(to_tensor, ToTensor)
            and isinstance(normalize, Normalize)):
        return None
    rgb_name = getattr(rgb, "__name__", type(rgb).__name__)
    if rgb_name not in _RGB_STEPS or getattr(rgb, "mode", "RGB") != "RGB":
        return None
    size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
    if (size is None or resize.interpolation not in _INTERPOLATIONS or resize.max_size is not None
            or resize.antialias is False):
        return None
    mean, std = tuple(float(m) for m in normalize.mean), tuple(float(s) for s in normalize.std)
    if len(mean) != 3 or len(std) != 3 or normalize.inplace:
        return None
    crop_hw = (int(crop.size[0]), int(crop.size[1]))
    if crop_hw[0] > size or crop_hw[1] > size:  # the reference would pad; we do not map padding
        return None
    return EvalPreprocess(int(size), crop_hw, mean, std, _INTERPOLATIONS[resize.interpolation])  # type: ignore[arg-type]


def resize_crop(images: torch.Tensor, spec: EvalPreprocess, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> resized to ``size`` (default: ``spec.output_size(H, W)``) and center-cropped, uint8.

    torchvision's uint8 kernel on CPU; on other devices torchvision resizes in float and rounds back.
    """
    out = size if size is not None else spec.output_size(images.shape[-2], images.shape[-1])
    mode = InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else InterpolationMode.BILINEAR
    images = F.resize(images, list(out), interpolation=mode, antialias=True)
    return F.center_crop(images, list(spec.crop))


class CPUDecoder:
    """Encoded image bytes -> uint8 [3, crop_h, crop_w], the eval transform up to normalisation.

    A picklable callable for :class:`~robustbench_ft.loading.shard_dataset.ShardDataset`'s ``decoder``: it runs in
    the DataLoader workers; the batch is normalised afterwards with :meth:`EvalPreprocess.normalize`,
    on the device, or, with ``normalize=True``, here already (float output: for a CPU model, whose
    process is busy with the forward pass, the workers should do all of the preprocessing).
    A sample that does not decode raises :class:`~robustbench_ft.shards.ShardError` naming it.
    """

    def __init__(self, spec: EvalPreprocess, normalize: bool = False):
        self.spec = spec
        self.normalize = normalize

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The size PIL's ``draft`` must at least keep, or None when no DCT scaling is allowed."""
        if self.spec.draft_factor is None:
            return None
        scale = self.spec.draft_factor * self.spec.resize / min(width, height)
        return (max(1, int(np.ceil(width * scale))), max(1, int(np.ceil(height * scale))))

    def __call__(self, data: bytes, shard: Path, key: str) -> torch.Tensor:
        image = decode_image(data, shard, key, draft=self.draft_size)
        original = image.info["original_size"]  # (width, height) before any draft scaling
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # HWC memory: torchvision's fast layout
        size = self.spec.output_size(original[1], original[0])
        out = resize_crop(pixels, self.spec, size)
        # contiguous first: the float ops run ~2x faster than on the HWC-strided resize output (same values)
        return self.spec.normalize(out.contiguous()[None])[0] if self.normalize else out



def transform_id(transform: Callable) -> str:
    """A short, stable identifier of a PIL preprocessing pipeline (its repr lists sizes, interpolation, mean/std)."""
    return hashlib.sha256(repr(transform).encode()).hexdigest()[:16]
