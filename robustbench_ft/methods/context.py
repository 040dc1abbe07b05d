"""What a method receives (MethodContext) and returns (Candidate)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

import torch

from robustbench_ft import distributed
from robustbench_ft.config import RunConfig
from robustbench_ft.datasets.build import ensure_dataset
from robustbench_ft.datasets.fewshot import ShotSubset, draw_subsets
from robustbench_ft.datasets.registry import get_dataset
from robustbench_ft.datasets.spec import Suite
from robustbench_ft.loading.training_batches import labelled_batches
from robustbench_ft.methods.resolve import ResolvedRun
from robustbench_ft.methods.training import Checkpointing
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.models.clip import CheckpointError, LoadedCLIP
from robustbench_ft.results import CHOICES, ENDPOINTS, Choice, Endpoint, Placement
from robustbench_ft.shards.urls import describe, is_url


@dataclass
class Candidate:
    """A named classifier to evaluate, placed in the report by typed fields.

    ``classifier`` is a :class:`Classifier` (image encoder + linear head: evaluation shares the encoder
    pass between candidates that share the encoder) or any module mapping images to outputs, such as
    the combinations of :mod:`robustbench_ft.models.combined`. ``alpha`` and ``curve`` put it on an
    interpolation curve (points of one curve are joined in α order); ``endpoint`` says it is the
    curve's zero-shot or fine-tuned end, which a base method's result must be; ``base`` names the
    method behind the fine-tuned endpoint; ``choice`` how its α was chosen ("fixed", "val" or "oracle": see
    :mod:`robustbench_ft.methods.alpha_curve`); ``extra`` holds anything else worth recording (JSON values).
    """

    name: str
    classifier: torch.nn.Module
    alpha: float | None = None
    curve: str | None = None
    endpoint: Endpoint | None = None
    base: str | None = None
    choice: Choice | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in (None, *ENDPOINTS):
            raise ValueError(f"candidate {self.name!r}: endpoint must be one of {ENDPOINTS} or None, "
                             f"got {self.endpoint!r}")
        if self.choice not in (None, *CHOICES):
            raise ValueError(f"candidate {self.name!r}: choice must be one of {CHOICES} or None, got {self.choice!r}")

    @property
    def placement(self) -> Placement:
        return Placement(self.alpha, self.curve, self.endpoint, self.base, self.choice)

    @property
    def tags(self) -> dict[str, Any]:
        """The record's ``tags``: the placement's fields that are set, then ``extra``."""
        return {**self.placement.tags(), **self.extra}


MAX_ALPHAS = 1001


def alpha_label(alpha: float) -> str:
    """α as candidate names show it: two decimals, more where they are needed (0.50, 0.25, 0.125)."""
    text = f"{alpha:.2f}"
    return text if float(text) == alpha else f"{alpha:.10g}"


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
                if step <= 0 or not all(math.isfinite(v) for v in (start, stop, step)):
                    raise ValueError
                count = int(math.floor((stop - start) / step + 1e-9)) + 1
                if count > MAX_ALPHAS:  # checked before the grid is built: 0:1:1e-9 would fill memory
                    raise ValueError(f"--alpha {text!r} has {count} values; at most {MAX_ALPHAS} (e.g. 0:1:0.001)")
                alphas = [round(start + i * step, 10) for i in range(count)]
            else:
                alphas = [float(p) for p in text.split(",") if p.strip()]
        except ValueError as exc:
            if "at most" in str(exc):
                raise
            raise ValueError(f"--alpha {text!r}: expected a number (0.5), a list (0,0.25,0.5) or a range "
                             "start:stop:step (0:1:0.1) of finite numbers") from None
    bad = [a for a in alphas if not (0.0 <= a <= 1.0) or math.isnan(a)]
    if bad or not alphas:
        raise ValueError(f"alpha must lie in [0, 1] (0 = zero-shot, 1 = fine-tuned); got {bad or 'nothing'}")
    if len(alphas) > MAX_ALPHAS:
        raise ValueError(f"--alpha has {len(alphas)} values; at most {MAX_ALPHAS}")
    alphas = sorted(set(alphas))
    labels = [alpha_label(a) for a in alphas]
    if len(set(labels)) != len(labels):  # candidate names must stay distinct: known before anything trains
        raise ValueError(f"--alpha values {alphas} do not have distinct names ({labels}); use fewer decimals")
    return tuple(alphas)


@dataclass
class MethodContext:
    """Everything a method may use. Methods call back into the context rather than building things themselves.

    ``run`` is the resolved run (config, suite, typed options with the suite's defaults); ``data`` is the
    content hash of every built split of the suite (``dataset/split`` -> manifest hash), part of the key
    of every checkpoint the method stores.
    """

    run: ResolvedRun
    clip: LoadedCLIP
    data: Mapping[str, str] = field(default_factory=dict)
    progress: bool = True
    log: Callable[[str], None] = print
    train_missing: bool = True  # False (analyses of a finished run): a checkpoint not in the cache is an error
    # --shots: role ("train"/"val") -> the drawn subset, drawn once by the top-level run's seed and shared by
    # every method it calls (a soup's ingredients at other seeds train on the same shots)
    subsets: dict[str, ShotSubset] = field(default_factory=dict)

    def shot_subsets(self) -> dict[str, ShotSubset]:
        """The k-shot subsets of this run (``--shots``), drawn on first use (see :mod:`~robustbench_ft.datasets.fewshot`)."""
        if self.config.shots is not None and not self.subsets:
            roles = ("train", "val") if self.suite.val is not None else ("train",)
            self.subsets.update(draw_subsets(self.config, {r: self._full_split_dir(r) for r in roles},
                                             self._split_names(roles), log=self.log))
        return self.subsets

    def _split_names(self, roles: Iterable[str]) -> dict[str, str]:
        return {r: "/".join(self.suite.train if r == "train" else self.suite.val) for r in roles}

    @property
    def config(self) -> RunConfig:
        return self.run.config

    @property
    def suite(self) -> Suite:
        return self.run.suite

    @property
    def options(self) -> Any:
        return self.run.options

    @cached_property
    def zeroshot(self) -> Classifier:
        ref = get_dataset(self.suite.reference)
        return Classifier.zeroshot(self.clip, ref.classnames, ref.templates,
                                   provenance={"model": self.clip.name, "method": "zeroshot"})

    def split_dir(self, which: Literal["train", "val"]) -> Path:
        """Shard directory of the suite's "train" or "val" split, built first if the harness can build it.

        These are the only splits a method may read: test and shift data are for evaluation alone.
        """
        if which not in ("train", "val"):
            raise ValueError(f"a method reads the suite's 'train' or 'val' split, not {which!r}")
        if which == "val" and self.suite.val is None:
            raise ValueError(f"suite {self.suite.name!r} declares no held-out (val) split, which this method needs "
                             "for its choices; declare one in the suite (Suite(val=(dataset, split))) or pick a "
                             "method that does not choose on held-out data")
        if which == "train" and self.suite.train is None:
            raise ValueError(f"suite {self.suite.name!r} is evaluation-only (no train split), but method "
                             f"{self.run.method.name!r} trains; pick a suite with a train split or a zero-shot method")
        if self.config.shots is not None:  # the k-shot protocol: the method sees the drawn subset only
            return self.shot_subsets()[which].directory
        return self._full_split_dir(which)

    def _full_split_dir(self, which: Literal["train", "val"]) -> Path:
        dataset, split = self.suite.train if which == "train" else self.suite.val
        if is_url(self.config.data_root):
            raise ValueError(f"--data-root {describe(self.config.data_root)} is a URL, but method "
                             f"{self.run.method.name!r} reads the {which} split ({dataset}/{split}), which is read "
                             "by position and must be local: keep --data-root a local directory and name the "
                             "streamed evaluation sets in [data_urls] (dataset = URL)")
        with distributed.main_first():  # under torchrun rank 0 builds it, the others then find it built
            return ensure_dataset(get_dataset(dataset), Path(self.config.data_root), split, log=self.log)

    def loader(self, which: Literal["train", "val"], *, batch_size: int | None = None,
               shuffle_seed: int | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Labelled batches (images with the eval transform, labels) of the suite's "train" or "val" split.

        In manifest order, or shuffled by ``shuffle_seed`` (the same order for any worker count).
        ``batch_size`` defaults to the run's evaluation batch size. For held-out choices (TPGM's
        projection radii, VRF's temperatures): never a test or shift split.
        """
        return labelled_batches(self.split_dir(which), self.clip.preprocess_eval,
                                batch_size or self.config.eval_batch_size, workers=self.config.workers,
                                shuffle_seed=shuffle_seed)

    def sub_context(self, name: str, options: Mapping[str, Any], *, seed: int | None = None) -> "MethodContext":
        """The context of another method under this run's settings (``seed`` replaced where given)."""
        sub = MethodContext(self.run.sub_run(name, options, seed=seed), self.clip, self.data, self.progress, self.log,
                            self.train_missing, self.shot_subsets())
        sub.__dict__["zeroshot"] = self.zeroshot  # share the zero-shot classifier (one text pass)
        return sub

    def run_method(self, name: str, options: Mapping[str, Any], *, seed: int | None = None) -> list[Candidate]:
        """Run another registered method (e.g. WiSE-FT's fine-tuned endpoint) under this run's settings.

        Its options are resolved like a top-level run's (the suite's defaults for it, then ``options``),
        so the same model is the same checkpoint whoever asks for it. ``seed`` replaces the run's seed
        for that method (model soups train one ingredient per seed).
        """
        sub = self.sub_context(name, options, seed=seed)
        return sub.run.method.cls().run(sub)

    def finetuned_endpoint(self, name: str, options: Mapping[str, Any], *, seed: int | None = None) -> Classifier:
        """Run another method (see :meth:`run_method`) and return its one candidate with ``endpoint="finetuned"``."""
        endpoints = [c for c in self.run_method(name, options, seed=seed) if c.endpoint == "finetuned"]
        if len(endpoints) != 1:
            raise ValueError(f"method {name!r} gave {len(endpoints)} candidates with endpoint='finetuned'; a base "
                             "method must give exactly one")
        return endpoints[0].classifier

    @property
    def checkpoint_path(self) -> Path:
        """Stem of this run's cached classifier (``.safetensors`` + ``.json``) and training state."""
        return Path(self.config.cache_dir) / "checkpoints" / f"{self.run.method.name}-{self.run.key(self.data)[:16]}"

    def training_checkpoints(self) -> Checkpointing:
        """Where training saves its resumable state every ``config.checkpoint_every`` steps, its curve
        (``<stem>.curve.csv`` beside the classifier) and, with ``--tensorboard DIR``, its event files
        (``DIR/<stem>/``)."""
        stem = self.checkpoint_path
        board = None if self.config.tensorboard is None else Path(self.config.tensorboard) / stem.name
        return Checkpointing(stem.with_suffix(".training.pt"), self.config.checkpoint_every,
                             stem.with_suffix(".curve.csv"), board)

    def trained_endpoint(self, train: Callable[[], Classifier], *, extra: dict[str, Any] | None = None
                         ) -> list[Candidate]:
        """The one candidate of a method that trains a classifier: ``train`` runs with torch seeded by the run's
        seed (or the classifier comes from the checkpoint cache, see :meth:`cached_classifier`), and the
        candidate, named after the method, is the fine-tuned end of any curve built over it."""
        torch.manual_seed(self.config.seed)
        model = self.cached_classifier(train)
        name = self.run.method.name
        return [Candidate(name, model, alpha=1.0, endpoint="finetuned", base=name, extra=dict(extra or {}))]

    def cached_classifier(self, train: Callable[[], Classifier]) -> Classifier:
        """Load this run's trained classifier from the checkpoint cache, or train and store it.

        The key is the resolved run (model, weights content, method, every option, suite, seed) and the
        suite's data (manifest hashes), so a second run with the same settings never trains again and a
        changed setting or shard set never reuses a stale one. Once the classifier is stored, the
        resumable training state is deleted. Under torchrun every rank trains (together) and rank 0 stores.
        """
        path = self.checkpoint_path
        state = self.training_checkpoints().path
        if path.with_suffix(".safetensors").is_file() and path.with_suffix(".json").is_file():
            try:
                cached = Classifier.load(path, device=self.clip.device, expected_model=self.config.model)
            except CheckpointError as exc:  # edited, truncated or replaced: never used, trained again
                self.log(f"warning: ignoring the cached checkpoint ({exc}); training again")
            else:
                self.log(f"using cached {self.run.method.name} checkpoint {path.with_suffix('.safetensors')}")
                if distributed.world().is_main:
                    state.unlink(missing_ok=True)  # left by a run killed between storing and deleting it
                return cached
        if not self.train_missing:
            raise FileNotFoundError(f"no cached {self.run.method.name} checkpoint at {path.with_suffix('.safetensors')}: "
                                    "the run was not finished with these settings and data, or its cache was removed; "
                                    "rerun `robustbench-ft run` with the same settings first")
        classifier = train()
        classifier.info.provenance.update({"config_hash": self.run.hash, "method": self.run.method.name})
        if distributed.world().is_main:
            classifier.save(path)
            state.unlink(missing_ok=True)
        distributed.barrier()
        return classifier
