"""Training you can look at: the loss, learning rate and gradient norm of every optimisation step.

:func:`robustbench_ft.methods.training.train` records one point per step in a :class:`TrainingCurve`
and hands it to a :class:`TrainingLog`, which

* keeps the whole curve in each resumable training state (so a resumed run's curve is whole: the
  steps before the resume come back from the state it resumes from, those after are appended),
* writes it as ``<checkpoint stem>.curve.csv`` (step, loss, lr, grad_norm) beside the classifier it
  trains, atomically, with each resumable state and at the end,
* optionally writes TensorBoard event files (``--tensorboard DIR``: ``DIR/<checkpoint stem>/``, scalars
  ``train/loss``, ``train/lr``, ``train/grad_norm``) when the ``tensorboard`` package is importable
  (the harness does not depend on it; the runner refuses the flag with a clear message without it).

The gradient norm is the total L2 norm of all trainable parameters' gradients before clipping, as
``torch.nn.utils.clip_grad_norm_`` returns it (with ``grad_clip = 0`` it is computed the same way and
nothing is clipped). A downsampled copy (at most :data:`RECORD_POINTS` points, the last step always
kept) travels with the trained classifier's provenance into result records, where reports draw it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from robustbench_ft.util import atomic_write_text

RECORD_POINTS = 200
FIELDS = ("step", "loss", "lr", "grad_norm")


@dataclass
class TrainingCurve:
    """One entry per optimisation step: its 0-based index, loss, learning rate and gradient norm."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float | None] = field(default_factory=list)  # None where it was not finite

    def append(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        self.step.append(int(step))
        self.loss.append(float(loss))
        self.lr.append(float(lr))
        self.grad_norm.append(float(grad_norm) if math.isfinite(grad_norm) else None)

    def __len__(self) -> int:
        return len(self.step)

    def upto(self, steps: int) -> "TrainingCurve":
        """The entries of the first ``steps`` steps (a resumed run continues from there)."""
        keep = [i for i, s in enumerate(self.step) if s < steps]
        return TrainingCurve(*([getattr(self, f)[i] for i in keep] for f in FIELDS))

    def to_dict(self) -> dict[str, list]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "TrainingCurve":
        """A curve from :meth:`to_dict` output; anything else (an old state without one) is an empty curve."""
        if not isinstance(data, dict) or not all(isinstance(data.get(f), list) for f in FIELDS):
            return cls()
        columns = [data[f] for f in FIELDS]
        if len({len(c) for c in columns}) != 1:
            return cls()
        return cls([int(v) for v in columns[0]], [float(v) for v in columns[1]], [float(v) for v in columns[2]],
                   [None if v is None else float(v) for v in columns[3]])

    def downsampled(self, points: int = RECORD_POINTS) -> dict[str, list]:
        """At most ``points`` evenly spaced entries, the last always among them (for records and figures)."""
        n = len(self)
        if n <= points:
            return self.to_dict()
        keep = sorted({round(i * (n - 1) / (points - 1)) for i in range(points)})
        return {f: [getattr(self, f)[i] for i in keep] for f in FIELDS}


class TrainingLog:
    """Where a run's curve goes while it trains (see the module docstring); only rank 0 writes."""

    def __init__(self, curve: TrainingCurve, path: Path | None = None, tensorboard: Path | None = None,
                 write: bool = True):
        self.curve, self.path, self.write = curve, path, write
        self._writer = None
        if tensorboard is not None and write:
            from torch.utils.tensorboard import SummaryWriter  # checked by the runner: the package is optional

            self._writer = SummaryWriter(log_dir=str(tensorboard))

    def step(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        self.curve.append(step, loss, lr, grad_norm)
        if self._writer is not None:
            for name, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm)):
                self._writer.add_scalar(f"train/{name}", value, step)

    def save(self) -> None:
        """Write the curve file (with each resumable state, and at the end): CSV with a header, one row a step,
        an empty grad_norm where it was not finite; ``pandas.read_csv`` reads it."""
        if self.write and self.path is not None:
            rows = zip(*(getattr(self.curve, f) for f in FIELDS))
            atomic_write_text(self.path, ",".join(FIELDS) + "\n" + "".join(
                ",".join("" if v is None else repr(v) for v in row) + "\n" for row in rows))
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        self.save()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
