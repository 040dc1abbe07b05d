"""From what a user set to what runs: ``resolve(config)`` applies the suite's defaults to the method's options
once, types them, and hashes the result.

Every part of a run that trains or evaluates is named by a :class:`ResolvedRun`: the top-level
method and every method it calls (WiSE-FT's fine-tuned endpoint, a soup's ingredients) through
:meth:`ResolvedRun.sub_run`. Its :attr:`~ResolvedRun.identity` holds *every* option of the method as
it runs, suite defaults included, so ``run --method finetune`` after ``run --method wise-ft`` names
the same fine-tuned model (and trains nothing), and editing a suite's defaults changes the key of
everything they reach. Checkpoint files named by options count by content, like ``--pretrained``.
Together with the content hashes of the data (:func:`robustbench_ft.datasets.build.data_identity`)
the identity keys checkpoints and records (:meth:`ResolvedRun.key`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Mapping

from robustbench_ft.config import NOT_HASHED, RunConfig
from robustbench_ft.datasets.registry import get_suite
from robustbench_ft.datasets.spec import Suite
from robustbench_ft.methods.registry import MethodSpec, get_method
from robustbench_ft.models.clip import BUNDLED_WEIGHTS, CHECKPOINT_SUFFIXES
from robustbench_ft.models.hub import fetch, is_hub
from robustbench_ft.util import file_sha256, slugify, stable_hash


@dataclass(frozen=True)
class ResolvedRun:
    """A run as it executes: its config, suite, method, and the method's typed options (suite defaults applied)."""

    config: RunConfig
    suite: Suite
    method: MethodSpec
    options: Any

    @cached_property
    def identity(self) -> dict[str, Any]:
        """What determines the results: the config's result-bearing fields, the weights by content, and
        every option of the method (and, through ``base_options``, of its base method) as it runs."""
        ident = {k: v for k, v in asdict(self.config).items() if k not in NOT_HASHED}
        if ident.get("shots") is None:  # a full-data run keeps the identity (and keys) it had before --shots
            ident.pop("shots", None)
        ident["method"] = self.method.name
        ident["pretrained"] = pretrained_identity(self.config.model, self.config.pretrained)
        ident["options"] = self.option_identity()
        return ident

    def option_identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            if f.name == "base_options" and isinstance(value, dict):
                value = self.sub_run(self.options.base, value).option_identity()
            elif dataclasses.is_dataclass(value):
                value = asdict(value)
            out[f.name] = content_identity(value)
        return out

    @cached_property
    def hash(self) -> str:
        """Hash of :attr:`identity` (records carry it as ``config_hash``)."""
        return stable_hash(self.identity)

    def key(self, data: Mapping[str, str]) -> str:
        """Hash of the identity and the data (``dataset/split`` -> manifest content hash): what names a
        checkpoint and a record, so that changed shards never meet an old checkpoint or record."""
        return stable_hash([self.identity, dict(sorted(data.items()))])

    @property
    def name(self) -> str:
        """The run's folder name under the results and reports directories."""
        return self.config.run_name or slugify(f"{self.suite.name}-{self.config.model}-{self.method.name}-"
                                               f"{self._shots_part}{self.hash[:8]}")

    @property
    def _shots_part(self) -> str:
        return "" if self.config.shots is None else f"{self.config.shots}shot-"

    @property
    def seeds_name(self) -> str:
        """The folder of a run over several seeds (``--seeds``): named by the identity without the seed;
        each seed's records go to ``<name>/seed-<s>/``."""
        return self.config.run_name or slugify(
            f"{self.suite.name}-{self.config.model}-{self.method.name}-{self._shots_part}"
            f"{stable_hash({k: v for k, v in self.identity.items() if k != 'seed'})[:8]}-seeds")

    def sub_run(self, method: str, options: Mapping[str, Any], *, seed: int | None = None) -> "ResolvedRun":
        """Another method under this run's settings (``seed`` replaced where given), resolved the same way."""
        config = self.config.with_method(method, dict(options))
        return resolve(config if seed is None else replace(config, seed=seed))


def resolve(config: RunConfig) -> ResolvedRun:
    """The run ``config`` describes: suite and method looked up, the suite's defaults for the method
    under the config's options, every value checked against the method's option types."""
    suite = get_suite(config.suite)
    method = get_method(config.method)
    options = method.make_options({**suite.method_defaults.get(method.name, {}), **config.method_options})
    if config.shots is not None and suite.train is None:
        raise ValueError(f"--shots {config.shots}: suite {suite.name!r} has no train split to draw shots from; "
                         "pick a suite with one (robustbench-ft list suites) or drop --shots")
    needs_val = getattr(method.cls, "needs_val", None)
    if suite.val is None and needs_val is not None and needs_val(options):  # refused before anything is written
        raise ValueError(f"method {method.name!r} trains on held-out data, but suite {suite.name!r} declares no "
                         "held-out (val) split; declare one in the suite (Suite(val=(dataset, split)), e.g. a "
                         "fraction of its training set held out as the transfer suites do) or pick another method")
    return ResolvedRun(config, suite, method, options)


def pretrained_identity(model: str, pretrained: str) -> Any:
    """A tag stays a tag; a file (local or bundled, or an hf-hub reference's weights) is identified by its
    content, not its path."""
    bundled = BUNDLED_WEIGHTS.get((model, pretrained))
    return content_identity(str(bundled) if bundled is not None else pretrained)


def content_identity(value: Any) -> Any:
    """A checkpoint file named by ``value`` as ``sha256:<digest>`` of its content; any other value as it is.

    The same path holding other weights is another run, and a copy elsewhere is the same run. An
    ``hf-hub:`` reference counts by the content of the file it resolves to (fetched into the hub cache).
    """
    if not isinstance(value, str):
        return value
    if is_hub(value):
        return f"sha256:{fetch(value).sha256}"
    path = Path(value)
    if path.suffix not in CHECKPOINT_SUFFIXES or not path.is_file():
        return value
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    """Hashed once per file version (identities are taken several times per run; checkpoints are large)."""
    return f"sha256:{file_sha256(Path(path))}"
