"""How an evaluation pass runs (EvalOptions), built once from a RunConfig and passed down."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from robustbench_ft.config import DECODE_MODES, RunConfig

VERIFY_LEVELS = ("none", "size", "hash")


@dataclass(frozen=True)
class EvalOptions:
    """Settings of an evaluation pass that change how fast it runs or how it fails, not the logits.

    ``verify`` checks the shard files against the manifest before the pass ("hash": a replaced or
    bit-rotted shard is refused by name rather than scored). ``on_bad="skip"`` leaves unreadable
    samples out instead of failing (the metrics are then over the samples read). ``decode`` and
    ``draft_factor`` choose the decode path (:func:`~robustbench_ft.evaluation.pipeline.eval_pipeline`;
    ``draft_factor`` does change pixels, and is part of a run's identity). ``compile_model``:
    ``torch.compile`` the encoders first (pays off on long GPU passes).
    """

    batch_size: int = 256
    workers: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    progress: bool = True
    on_bad: str = "error"
    verify: str = "hash"
    decode: str = "auto"
    draft_factor: float | None = None
    compile_model: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"evaluation needs batch_size >= 1 and workers >= 0, got {self.batch_size}, {self.workers}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if self.verify not in VERIFY_LEVELS:
            raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {self.verify!r}")
        if self.on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {self.on_bad!r}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @classmethod
    def from_config(cls, config: RunConfig, device: torch.device | str, *, progress: bool = True) -> "EvalOptions":
        """The evaluation settings of a run, on the device its models are on."""
        return cls(batch_size=config.eval_batch_size, workers=config.workers, device=str(device),
                   precision=config.precision, progress=progress, on_bad=config.on_bad_sample,
                   decode=config.decode, draft_factor=config.draft_factor, compile_model=config.compile)
