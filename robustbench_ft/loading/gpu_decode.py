"""Evaluation decoding on the device: JPEG batch decode (nvJPEG), resize, crop and normalise on the GPU.

On a GPU the CPU cores, not the network, limit an evaluation pass: a ViT-B/32 forward costs far less
than decoding and resizing the JPEG on a core. This path moves all of that to the device:
DataLoader workers only read tar shards and ship each sample's encoded bytes (pinned memory,
prefetched); the main process hands a whole batch to ``torchvision.io.decode_jpeg(list, device=...)``
(nvJPEG batch decode on CUDA), resizes images of equal size together, crops, normalises and
returns a channels-last float batch ready for a bf16-autocast forward.

The parameters come from open_clip's eval transform (:func:`~robustbench_ft.loading.eval_decode.parse_eval_transform`);
for a transform that cannot be mapped, or a shard set that is not JPEG, evaluation uses the CPU
path instead (see :func:`robustbench_ft.evaluation.pipeline.eval_pipeline`). The same code runs with ``device="cpu"`` (torchvision's libjpeg-turbo
decode), which is how it is tested on machines without a GPU. Pixels differ from the CPU path by
rounding only (the device resizes in float and rounds back to uint8 levels); nvJPEG's IDCT may
differ from libjpeg-turbo's by a grey level, so this path has its own transform id in cache keys.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from robustbench_ft.loading.eval_decode import EvalPreprocess, resize_crop
from robustbench_ft.loading.shard_dataset import collate_with_meta, decode_image, locate_sample


def encoded_bytes(data: bytes, shard: Path, key: str) -> torch.Tensor:
    """The GPU path's per-sample "decoder" in the DataLoader workers: the JPEG bytes as a uint8 tensor."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def collate_encoded(batch: list[tuple], with_meta: bool = False) -> list:
    """Collate samples whose images are encoded bytes of different lengths: those stay a list."""
    rest = [item[1:] for item in batch]
    return [[item[0] for item in batch], *(collate_with_meta(rest) if with_meta else default_collate(rest))]


def collate_for(with_meta: bool) -> functools.partial:
    """A picklable collate function for DataLoader workers."""
    return functools.partial(collate_encoded, with_meta=with_meta)


class DeviceDecoder:
    """A batch of encoded JPEGs -> normalised float images [B, 3, crop_h, crop_w] on ``device``.

    A batch that nvJPEG refuses (a CMYK or corrupt file) is decoded image by image; an image
    the device cannot decode is decoded by PIL on the CPU (as the reference does), and one that
    PIL cannot decode either raises :class:`ShardError` naming its shard and key.
    """

    def __init__(self, spec: EvalPreprocess, device: torch.device | str, directory: str | Path = "",
                 channels_last: bool = True):
        if spec.draft_factor is not None:
            raise ValueError("the device decoder has no reduced-size (draft) JPEG decode; use draft_factor=None")
        self.spec = spec
        self.device = torch.device(device)
        self.directory = Path(directory)
        self.channels_last = channels_last

    @property
    def id(self) -> str:
        """The transform id of this path's pixels (cache keys): the spec's, marked as device-decoded."""
        return f"dev-{self.spec.id}"

    def decode(self, encoded: list[torch.Tensor], indices: list[int] | None = None) -> list[torch.Tensor]:
        """uint8 [3, H, W] images on the device, one per encoded JPEG."""
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass  # one bad image fails the whole batch call: find it, decode the others
        out = []
        for i, data in enumerate(encoded):
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                shard, key = (locate_sample(self.directory, indices[i]) if indices is not None
                              else (self.directory, f"sample #{i}"))
                image = decode_image(data.numpy().tobytes(), shard, key)  # raises ShardError naming shard and key
                out.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).to(self.device))
        return out

    def __call__(self, encoded: list[torch.Tensor], indices: list[int] | None = None) -> torch.Tensor:
        images = self.decode(encoded, indices)
        crop_h, crop_w = self.spec.crop
        out = torch.empty((len(images), 3, crop_h, crop_w), dtype=torch.uint8, device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        for members in groups.values():  # one resize call per distinct source size
            out[members] = resize_crop(torch.stack([images[i] for i in members]), self.spec)
        batch = self.spec.normalize(out)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

