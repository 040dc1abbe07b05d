"""What a method receives (MethodContext) and returns (Candidate)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from robustbench_ft import distributed
from robustbench_ft.config import RunConfig
from robustbench_ft.data.registry import Suite, ensure_dataset, get_dataset
from robustbench_ft.methods.training import Checkpointing
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.models.clip import LoadedCLIP


@dataclass
class Candidate:
    """A named classifier to evaluate, with tags that place it in the report (alpha, curve, endpoint)."""

    name: str
    classifier: Classifier
    tags: dict[str, Any] = field(default_factory=dict)


def parse_alphas(value: Any) -> tuple[float, ...]:
    """``0.5`` | ``"0,0.25,0.5"`` | ``"0:1:0.1"`` (start:stop:step, stop included) -> sorted unique alphas in [0, 1]."""
    if isinstance(value, (int, float)):
        alphas = [float(value)]
    elif isinstance(value, (list, tuple)):
        alphas = [float(v) for v in value]
    else:
        text = str(value).strip()
        try:
            if ":" in text:
                start, stop, step = (float(p) for p in text.split(":"))
                if step <= 0:
                    raise ValueError
                count = int(math.floor((stop - start) / step + 1e-9)) + 1
                alphas = [round(start + i * step, 10) for i in range(count)]
            else:
                alphas = [float(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"--alpha {text!r}: expected a number (0.5), a list (0,0.25,0.5) or a range "
                             "start:stop:step (0:1:0.1)") from None
    bad = [a for a in alphas if not (0.0 <= a <= 1.0) or math.isnan(a)]
    if bad or not alphas:
        raise ValueError(f"alpha must lie in [0, 1] (0 = zero-shot, 1 = fine-tuned); got {bad or 'nothing'}")
    return tuple(sorted(set(alphas)))


@dataclass
class MethodContext:
    """Everything a method may use. Methods call back into the context rather than building things themselves."""

    config: RunConfig
    clip: LoadedCLIP
    suite: Suite
    options: Any
    progress: bool = True
    log: Callable[[str], None] = print

    @cached_property
    def zeroshot(self) -> Classifier:
        ref = get_dataset(self.suite.reference)
        return Classifier.zeroshot(self.clip, ref.classnames, ref.templates,
                                   provenance={"model": self.clip.name, "method": "zeroshot"})

    def split_dir(self, which: str) -> Path:
        """Shard directory of the suite's "train" or "val" split, built first if the harness can build it."""
        if which == "val" and self.suite.val is None:
            raise ValueError(f"suite {self.suite.name!r} declares no held-out (val) split")
        dataset, split = self.suite.train if which == "train" else self.suite.val
        with distributed.main_first():  # under torchrun rank 0 builds it, the others then find it built
            return ensure_dataset(get_dataset(dataset), Path(self.config.data_root), split, log=self.log)

    def run_method(self, name: str, options: dict[str, Any], *, seed: int | None = None) -> list[Candidate]:
        """Run another registered method (e.g. WiSE-FT's fine-tuned endpoint) under this run's settings.

        ``seed`` replaces the run's seed for that method (model soups train one ingredient per seed);
        it is part of the sub-run's config, so each seed has its own cached checkpoint.
        """
        from robustbench_ft.methods.registry import get_method

        spec = get_method(name)
        config = self.config.with_method(spec.name, options)
        if seed is not None:
            config = replace(config, seed=seed)
        sub = MethodContext(config, self.clip, self.suite, spec.make_options(options), self.progress, self.log)
        sub.__dict__["zeroshot"] = self.zeroshot  # share the zero-shot classifier (one text pass)
        return spec.cls().run(sub)

    def finetuned_endpoint(self, name: str, options: dict[str, Any], *, seed: int | None = None) -> Classifier:
        """Run another method (see :meth:`run_method`) and return its one candidate tagged ``endpoint=finetuned``."""
        endpoints = [c for c in self.run_method(name, options, seed=seed) if c.tags.get("endpoint") == "finetuned"]
        if len(endpoints) != 1:
            raise ValueError(f"method {name!r} gave {len(endpoints)} candidates tagged endpoint=finetuned; a base "
                             "method must give exactly one")
        return endpoints[0].classifier

    @property
    def checkpoint_path(self) -> Path:
        """Stem of this config's cached classifier (``.safetensors`` + ``.json``) and training state."""
        return Path(self.config.cache_dir) / "checkpoints" / f"{self.config.method}-{self.config.hash()[:16]}"

    def training_checkpoints(self) -> Checkpointing:
        """Where training saves its resumable state every ``config.checkpoint_every`` steps."""
        return Checkpointing(self.checkpoint_path.with_suffix(".training.pt"), self.config.checkpoint_every)

    def cached_classifier(self, train: Callable[[], Classifier]) -> Classifier:
        """Load this config's trained classifier from the checkpoint cache, or train and store it.

        The cache key is the config hash (model, weights content, method, options, suite, seed), so a
        second run with the same settings never trains again and a changed setting never reuses a stale one.
        Once the classifier is stored, the resumable training state is deleted. Under torchrun every
        rank trains (together) and rank 0 stores.
        """
        path = self.checkpoint_path
        state = self.training_checkpoints().path
        if path.with_suffix(".safetensors").is_file() and path.with_suffix(".json").is_file():
            self.log(f"using cached {self.config.method} checkpoint {path.with_suffix('.safetensors')}")
            if distributed.world().is_main:
                state.unlink(missing_ok=True)  # left by a run killed between storing and deleting it
            return Classifier.load(path, device=self.clip.device)
        classifier = train()
        classifier.info.provenance.update({"config_hash": self.config.hash(), "method": self.config.method})
        if distributed.world().is_main:
            classifier.save(path)
            state.unlink(missing_ok=True)
        distributed.barrier()
        return classifier
