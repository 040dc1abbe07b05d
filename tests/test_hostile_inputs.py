"""Hostile and clumsy input, second pass (issue 19): one test per class of what got through before.

(Config values and submissions: tests/test_config_types.py, tests/test_submissions.py, tests/test_hostile.py.)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTH_CLASSES, synth_builder, synth_image

from robustbench_ft import RunConfig, run
from robustbench_ft.cli import main
from robustbench_ft.config import MAX_RUN_NAME
from robustbench_ft.datasets.registry import get_dataset
from robustbench_ft.methods.context import parse_alphas
from robustbench_ft.shards.manifest import Manifest, ShardError
from robustbench_ft.typed import ConfigError

TINY = dict(model="rbft-tiny-vit", pretrained="random", suite="synthetic", report=False)


def _zeroshot(run_dirs, **kw) -> RunConfig:
    return RunConfig(method="zeroshot", **{**TINY, **kw}, **run_dirs)


# --- 3a. class lists ----------------------------------------------------------------------------

def _folder_tree(root: Path, classes: tuple[str, ...], n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for label, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            synth_image(label, rng).save(root / cls / f"{i}.png")
    return root


def test_a_shard_set_in_another_class_order_is_refused_naming_the_first_difference(run_dirs, tmp_path, capsys):
    tree = _folder_tree(tmp_path / "tree", SYNTH_CLASSES)   # red, green, blue: folders sort as blue, green, red
    target = get_dataset("synth-inverted").path(Path(run_dirs["data_root"]), "test")
    assert main(["shard", "imagefolder", str(tree), str(target)]) == 0  # alphabetical: every label moves
    capsys.readouterr()
    assert main(["verify", str(target)]) == 2
    assert "class 0 is 'blue' there but 'red' in 'synth-inverted'" in capsys.readouterr().err
    with pytest.raises(ShardError, match=r"classes are not those of dataset 'synth-inverted'.*--dataset synth-inverted"):
        run(_zeroshot(run_dirs), progress=False, log=lambda m: None)
    assert main(["shard", "imagefolder", str(tree), str(target), "--dataset", "synth-inverted"]) == 0
    assert Manifest.load(target).classes == SYNTH_CLASSES
    assert main(["verify", str(target)]) == 0 and "the classes match dataset 'synth-inverted'" in capsys.readouterr().out
    out = run(_zeroshot(run_dirs), progress=False, log=lambda m: None)
    assert out.records[0].metrics["synth-inverted"]["n"] == 12


def test_a_folder_tree_without_the_datasets_classes_is_refused(tmp_path, capsys):
    tree = _folder_tree(tmp_path / "tree", ("red", "green", "purple"))
    assert main(["shard", "imagefolder", str(tree), str(tmp_path / "out"), "--dataset", "synth"]) == 2
    assert "missing ['blue'], unexpected ['purple']" in capsys.readouterr().err


def test_a_manifest_with_an_extra_class_fails_verify(run_dirs, capsys):
    target = get_dataset("synth-inverted").path(Path(run_dirs["data_root"]), "test")
    synth_builder(12, 4, inverted=True)(target)
    data = json.loads((target / "manifest.json").read_text())
    data["classes"].append("yellow")
    (target / "manifest.json").write_text(json.dumps(data))
    assert main(["verify", str(target)]) == 2
    assert "it has 4 classes, 'synth-inverted' has 3" in capsys.readouterr().err

    # anywhere else, the dataset the manifest was built for is checked, and an unnamed set says it was not
    elsewhere = Path(run_dirs["data_root"]).parent / "elsewhere"
    shutil.copytree(target, elsewhere)
    assert main(["verify", str(elsewhere)]) == 0
    assert "class list not checked (no registered dataset named: pass --dataset NAME)" in capsys.readouterr().out
    data["metadata"] = {**data.get("metadata", {}), "dataset": "synth-inverted"}
    (elsewhere / "manifest.json").write_text(json.dumps(data))
    assert main(["verify", str(elsewhere)]) == 2
    assert "it has 4 classes, 'synth-inverted' has 3" in capsys.readouterr().err


# --- 3b. a non-finite head -------------------------------------------------------------------------

def test_a_nan_head_is_refused_by_import_and_by_finetuned(run_dirs, tmp_path, capsys):
    from safetensors.torch import save_file

    from robustbench_ft.models import load_clip

    visual = {f"image_encoder.model.visual.{k}": v.contiguous()
              for k, v in load_clip("rbft-tiny-vit", "random").model.visual.state_dict().items()}
    head = torch.zeros(3, 32)
    head[1, 4] = float("nan")
    path = tmp_path / "wise-ft-layout.safetensors"
    save_file({**visual, "classification_head.weight": head, "classification_head.bias": torch.zeros(3)}, str(path))
    assert main(["import-checkpoint", str(path), str(tmp_path / "out"), "--model", "rbft-tiny-vit",
                 "--suite", "synthetic"]) == 2
    assert "'head.weight' holds NaN or infinite values" in capsys.readouterr().err
    config = RunConfig(method="wise-ft", method_options={"finetuned": str(path), "select": False}, **TINY, **run_dirs)
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        run(config, progress=False, log=lambda m: None)
    assert not Path(run_dirs["results_dir"]).exists() or not list(Path(run_dirs["results_dir"]).rglob("*.json"))


# --- 3c. records follow the data -------------------------------------------------------------------

def test_a_changed_shard_set_is_never_served_an_old_record_or_cached_logits(run_dirs):
    first = run(_zeroshot(run_dirs), progress=False, log=lambda m: None).records[0]
    target = get_dataset("synth-inverted").path(Path(run_dirs["data_root"]), "test")
    synth_builder(24, 99, inverted=True)(target)  # other images, same classes and size
    logs: list[str] = []
    second = run(_zeroshot(run_dirs), progress=False, log=logs.append).records[0]
    assert not any("reusing" in m for m in logs)
    assert first.data["synth-inverted/test"] != second.data["synth-inverted/test"]
    assert first.data["synth/test"] == second.data["synth/test"] and first.record_id != second.record_id


# --- 3d. caches are checked ------------------------------------------------------------------------

def test_edited_or_short_cache_entries_are_named_dropped_and_recomputed(run_dirs):
    reference = run(_zeroshot(run_dirs), progress=False, log=lambda m: None).records[0].metrics
    logits_dir = Path(run_dirs["cache_dir"]) / "logits"
    entries = sorted(p for p in logits_dir.glob("*.npy") if not p.name.endswith(".labels.npy"))
    assert len(entries) == 2
    edited, short = entries
    array = np.load(edited)
    np.save(edited, (np.where(np.arange(array.shape[1]) == 0, 100.0, -100.0) * np.ones_like(array)).astype(array.dtype))
    np.save(short, np.load(short)[:7])  # 7 rows for a 24-sample set
    for cache_dir in ("features",):  # the features are consistent: drop them so the logits must be recomputed
        for p in (Path(run_dirs["cache_dir"]) / cache_dir).glob("*"):
            p.unlink()
    logs: list[str] = []
    results = Path(run_dirs["results_dir"])
    for p in results.rglob("*.json"):
        p.unlink()
    again = run(_zeroshot(run_dirs), progress=False, log=logs.append).records[0].metrics
    warnings = [m for m in logs if "cache entry" in m]
    assert len(warnings) == 2 and any("changed since it was written" in m for m in warnings)
    assert any("for 7 samples, but the dataset has 24" in m for m in warnings)
    assert again == reference


def test_an_edited_cached_checkpoint_is_not_used(run_dirs):
    config = RunConfig(method="finetune", method_options={"max_steps": 2, "batch_size": 8, "warmup_steps": 1},
                       **TINY, **run_dirs)
    first = run(config, progress=False, log=lambda m: None).records[0]
    (weights,) = (Path(run_dirs["cache_dir"]) / "checkpoints").glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    for p in Path(run_dirs["results_dir"]).rglob("*.json"):
        p.unlink()
    logs: list[str] = []
    second = run(config, progress=False, log=logs.append).records[0]
    assert any("ignoring the cached checkpoint" in m and "sha256 changed" in m for m in logs)
    assert second.metrics == first.metrics  # trained again, bit for bit


def test_temporary_files_of_a_killed_run_are_removed_by_the_next_run(run_dirs):
    logits = Path(run_dirs["cache_dir"]) / "logits"
    logits.mkdir(parents=True)
    dead = logits / ".rows-4999999-abcdef012345.tmp.npy"  # a pid no process has
    dead.write_bytes(b"\0" * 1024)
    dead_earlier = logits / ".0123abcd.npy.4999999-0123456789abcdef.tmp.npy"  # as earlier versions named them
    dead_earlier.write_bytes(b"\0")
    mine = logits / f".rows-{os.getpid()}-abcdef012345.tmp.npy"
    mine.write_bytes(b"\0")
    from robustbench_ft.evaluation import cache as cache_module

    cache_module._cleaned.discard(logits)
    run(_zeroshot(run_dirs), progress=False, log=lambda m: None)
    assert not dead.exists() and not dead_earlier.exists() and mine.exists()  # a live process's file stays


# --- 4. resource exhaustion ------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("0:1:1e-9", "has 1000000000 values; at most 1001"),
    ("0:inf:0.1", "of finite numbers"),
    ("0:1:0", "of finite numbers"),
    ("0.1234567890001,0.1234567890002", "do not have distinct names"),
])
def test_alpha_grids_are_bounded_and_checked_before_anything_runs(text, message):
    with pytest.raises(ValueError, match=message):
        parse_alphas(text)


def test_a_sidecar_naming_another_architecture_is_refused_before_it_is_built(run_dirs, tmp_path, monkeypatch):
    from robustbench_ft.models import classifier as classifier_module

    weights = tmp_path / "clf.safetensors"
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(3, 4)}, str(weights))
    weights.with_suffix(".json").write_text(json.dumps({
        "format": "robustbench-ft-classifier", "version": 1, "num_classes": 3, "model": "ViT-bigG-14",
        "classnames": list(SYNTH_CLASSES), "templates": ["{}"]}))
    built = []
    monkeypatch.setattr(classifier_module, "create_architecture", lambda model: built.append(model))
    config = RunConfig(method="wise-ft", method_options={"finetuned": str(weights)}, **TINY, **run_dirs)
    with pytest.raises(ValueError, match="is a 'ViT-bigG-14' classifier .* this run uses --model rbft-tiny-vit"):
        run(config, progress=False, log=lambda m: None)
    assert built == []


# --- 5. run names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../elsewhere", "/abs/path", "a/b", ".hidden", "x" * (MAX_RUN_NAME + 1), ""])
def test_a_run_name_is_one_bounded_folder_name(name):
    with pytest.raises(ConfigError, match="must be one folder name"):
        RunConfig(run_name=name)


def test_a_run_name_used_by_another_config_is_refused_unless_overwrite(run_dirs, capsys):
    run(_zeroshot(run_dirs, run_name="mine"), progress=False, log=lambda m: None)
    other = RunConfig(method="wise-ft", method_options={"select": False, "finetuned": None,
                                                       "base_options": {"max_steps": 2, "batch_size": 8}},
                      run_name="mine", **TINY, **run_dirs)
    with pytest.raises(FileExistsError, match="holds records of another configuration.*--overwrite"):
        run(other, progress=False, log=lambda m: None)
    folder = Path(run_dirs["results_dir"]) / "mine"
    assert [p.name for p in folder.iterdir()] == ["zeroshot.json"]  # untouched
    from dataclasses import replace

    out = run(replace(other, overwrite=True), progress=False, log=lambda m: None)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in out.record_paths)
    assert {r.method for r in out.records} == {"wise-ft"}


# --- 6. files and paths ----------------------------------------------------------------------------

def test_the_build_lock_does_not_follow_a_symlink(run_dirs, tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    target = get_dataset("synth").path(Path(run_dirs["data_root"]), "test")
    target.parent.mkdir(parents=True)
    (target.parent / f".{target.name}.lock").symlink_to(victim)
    with pytest.raises(ShardError, match="it must be a plain file"):
        run(_zeroshot(run_dirs), progress=False, log=lambda m: None)
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("name", ["../../outside-000000.tar", "/etc/passwd", "sub/x-000000.tar"])
def test_manifest_shard_names_stay_in_their_directory(tmp_path, name):
    synth_builder(6, 1)(tmp_path / "set")
    data = json.loads((tmp_path / "set" / "manifest.json").read_text())
    data["shards"][0]["name"] = name
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match="is not a file name inside the shard directory"):
        Manifest.load(tmp_path / "set")


def test_output_path_mistakes_are_one_line(tmp_path, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    published = str(Path(__file__).parents[1] / "results" / "published")
    assert main(["leaderboard", published, "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"robustbench-ft: error: {folder}: is a directory, not a file; check the path (a file where a " \
                  "file is written, a folder for a folder)"
    afile = tmp_path / "a-file"
    afile.write_text("")
    assert main(["leaderboard", published, "--out", str(afile / "board.md")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_an_unreadable_image_in_a_folder_tree_is_named(tmp_path, capsys):
    tree = _folder_tree(tmp_path / "tree", SYNTH_CLASSES, n=2)
    (tree / "red" / "broken.png").write_bytes(b"not a png")
    assert main(["shard", "imagefolder", str(tree), str(tmp_path / "out"), "--dataset", "synth"]) == 2
    assert "broken.png" in capsys.readouterr().err
