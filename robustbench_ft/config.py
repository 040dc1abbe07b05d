"""RunConfig: everything a user sets for a run, from flags, a TOML file or Python, each value type-checked.

The lowest layer with :mod:`robustbench_ft.typed` and :mod:`robustbench_ft.util`: it names a method
and a suite but imports neither registry. :func:`robustbench_ft.methods.resolve.resolve` turns a
RunConfig into the run that executes (suite defaults applied, options typed) and hashes *that*.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from robustbench_ft.perturbations.spec import parse_perturbations
from robustbench_ft.typed import ConfigError, check, check_fields

Precision = Literal["fp32", "amp_bf16"]
DecodeMode = Literal["auto", "device", "fast", "reference"]
OnBadSample = Literal["error", "skip"]
DECODE_MODES: tuple[str, ...] = get_args(DecodeMode)


MAX_RUN_NAME = 120
RUN_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+=-]{{0,{MAX_RUN_NAME - 1}}}")
# Fields that change where things go or how fast, not what is computed: left out of a run's identity.
# on_bad_sample too: it changes nothing on intact data (a skip-mode run must not retrain a cached
# checkpoint), and a record that skipped samples says so itself (ResultRecord.skipped_samples).
# decode too: its paths agree within one grey level (docs/performance.md); draft_factor does not, so it counts.
# data_urls too: where shards are read from does not change them (records and caches key on their content).
# perturbations / attack_samples too: they add robust accuracies to the records, changing no training or clean
# score; the records' ids include them (runner.perturbation_key), so another choice is scored afresh.
NOT_HASHED = frozenset({"perturbations", "attack_samples",
                        "data_root", "data_urls", "cache_dir", "results_dir", "reports_dir", "eval_batch_size",
                        "workers", "device", "run_name", "report", "trust_pickle", "on_bad_sample",
                        "checkpoint_every", "decode", "compile", "overwrite", "tensorboard", "method_options", "seeds"})


@dataclass(frozen=True)
class RunConfig:
    model: str = "rbft-demo-vit"
    pretrained: str = "rbft-demo"
    method: str = "wise-ft"
    method_options: dict[str, Any] = field(default_factory=dict)  # validated by the method's options dataclass
    suite: str = "demo"
    data_root: str = "datasets"    # a directory, or an http(s):// URL under which <dataset>/test/ are streamed
    # dataset -> URL of its test split's shard directory (manifest.json + shards), streamed and hash-checked;
    # a TOML [data_urls] table, or --data-urls name=URL,name=URL
    data_urls: dict[str, str] = field(default_factory=dict)
    cache_dir: str = ".cache/robustbench-ft"
    results_dir: str = "results"
    reports_dir: str = "reports"
    eval_batch_size: int = 256     # evaluation batch size (the training batch size is a method option)
    workers: int = 2
    device: str = "auto"
    precision: Precision = "fp32"
    seed: int = 0
    run_name: str | None = None
    report: bool = True
    trust_pickle: bool = False
    on_bad_sample: OnBadSample = "error"  # unreadable evaluation samples: "error" stops naming them, "skip" leaves them out
    checkpoint_every: int = 500    # fine-tuning saves a resumable training state every N steps (0 = never)
    decode: DecodeMode = "auto"    # evaluation decode path: auto | device (GPU nvJPEG) | fast | reference
    draft_factor: float | None = None  # JPEG DCT-domain downscaling while >= factor x the resize (opt-in)
    compile: bool = False          # torch.compile the evaluated models

    overwrite: bool = False        # a --run-name already used by another config: replace its records
    seeds: tuple[int, ...] | None = None  # run once per seed (each its own training); None: just `seed`
    tensorboard: str | None = None  # also write fine-tuning curves as TensorBoard events under this directory
    # k-shot protocol: train (and choose) on K samples per class of the suite's train (and val) split, drawn
    # by the seed (robustbench_ft.datasets.fewshot); None: the whole splits
    shots: int | None = None
    # perturbed copies of the reference test set scored as robust accuracy (docs/perturbations.md), e.g.
    # linf-4/255,l2-2.0,l1-75,corruptions-s3; attack_samples: a seeded subset of that many (None: all)
    perturbations: tuple[str, ...] = ()
    attack_samples: int | None = None

    def __post_init__(self) -> None:
        check_fields(self)  # every source (TOML, Python, CLI) is held to the declared types
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 = never), got {self.checkpoint_every}")
        if self.draft_factor is not None and self.draft_factor < 1:
            raise ValueError(f"draft_factor must be >= 1 (or unset), got {self.draft_factor}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"shots must be >= 1 (samples per class), got {self.shots}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        parse_perturbations(self.perturbations)  # an unknown name or a repeated one: refused before any work
        if self.attack_samples is not None and self.attack_samples < 1:
            raise ConfigError(f"attack_samples must be >= 1 (or unset for the whole test set), "
                              f"got {self.attack_samples}")
        if self.run_name is not None and not RUN_NAME.fullmatch(self.run_name):
            raise ConfigError(f"run_name {self.run_name[:80]!r} must be one folder name of 1-{MAX_RUN_NAME} letters, "
                              "digits and . _ + = - (starting with a letter or digit), not a path: it names "
                              "<results-dir>/<run-name>/ and <reports-dir>/<run-name>/")

    def with_method(self, method: str, options: dict[str, Any]) -> "RunConfig":
        return replace(self, method=method, method_options=dict(options))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "RunConfig":
        """Read a TOML config: top-level RunConfig keys plus an optional ``[method]`` table of method options.

        ``overrides`` (from command-line flags) win over the file.
        """
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML ({exc})") from exc
        try:
            return cls._from_table(data, overrides)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def _from_table(cls, data: dict[str, Any], overrides: dict[str, Any]) -> "RunConfig":
        options = check(data.pop("method_options", {}), dict[str, Any], "method_options")
        if isinstance(data.get("method"), dict):  # [method] table: name = "...", other keys are options
            table = dict(data.pop("method"))
            if "name" in table:
                data["method"] = table.pop("name")
            options = {**options, **table}
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(valid - {'method_options'})} "
                              "and a [method] table of method options")
        merged = {**data, **{k: v for k, v in overrides.items() if k != "method_options"}}
        merged["method_options"] = _merge(options, overrides.get("method_options", {}))
        return cls(**merged)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (nested tables such as WiSE-FT's base_options merge key by key)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
