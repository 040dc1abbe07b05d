"""The k-shot protocol (``--shots K``): balanced seeded subsets, recorded and keyed, refused on bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from robustbench_ft import RunConfig, run
from robustbench_ft.board.leaderboard import build_leaderboard
from robustbench_ft.board.render import to_csv, to_markdown
from robustbench_ft.cli.run import run_config_from_argv
from robustbench_ft.datasets.build import ensure_dataset
from robustbench_ft.datasets.fewshot import ShotsError, draw_positions, ensure_subset
from robustbench_ft.datasets.registry import get_dataset, register_suite
from robustbench_ft.datasets.spec import Suite
from robustbench_ft.loading.training_batches import load_index
from robustbench_ft.methods.resolve import resolve
from robustbench_ft.shards.manifest import Manifest
from robustbench_ft.typed import ConfigError

TINY = dict(model="rbft-tiny-vit", pretrained="random", suite="synthetic", report=False)
QUICK = {"max_steps": 2, "batch_size": 256, "warmup_steps": 1, "lr": 1e-3}  # 256 > 2 x 3 shots: one full batch
CLASSES = ("a", "b", "c")


def test_draw_is_balanced_seeded_and_role_independent():
    labels = np.array([0, 1, 2] * 10)
    first = draw_positions(labels, CLASSES, 4, seed=0, role="train", where="x/train")
    assert np.bincount(labels[first]).tolist() == [4, 4, 4] and list(first) == sorted(set(first))
    assert np.array_equal(first, draw_positions(labels, CLASSES, 4, seed=0, role="train", where="x/train"))
    assert not np.array_equal(first, draw_positions(labels, CLASSES, 4, seed=1, role="train", where="x/train"))
    assert not np.array_equal(first, draw_positions(labels, CLASSES, 4, seed=0, role="val", where="x/train"))


def test_k_above_a_class_count_names_the_class():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 5)
    with pytest.raises(ShotsError, match=r"--shots 3: x/train has fewer than 3 samples in 1 class\(es\) \('b' has 2\); "
                                         r"pass a smaller --shots \(at most 2 here\)"):
        draw_positions(labels, CLASSES, 3, seed=0, role="train", where="x/train")


def test_subset_copies_the_chosen_samples(tmp_path):
    source = ensure_dataset(get_dataset("synth"), tmp_path / "data", "train", log=lambda m: None)
    sub = ensure_subset(source, "synth/train", tmp_path / "cache", 2, 7, "train", log=lambda m: None)
    manifest, full = Manifest.load(sub.directory), load_index(source, Manifest.load(source))
    index = load_index(sub.directory, manifest)
    assert manifest.num_samples == 6 and np.bincount(index.label).tolist() == [2, 2, 2]
    by_key = dict(zip(full.key.tolist(), full.label.tolist()))
    assert all(by_key[k] == y for k, y in zip(index.key.tolist(), index.label.tolist()))
    assert manifest.metadata["fewshot"]["keys_sha256"] == sub.keys_hash
    again = ensure_subset(source, "synth/train", tmp_path / "cache", 2, 7, "train", log=pytest.fail)  # reused
    assert again == sub


def test_shots_flag_and_config_checks():
    assert run_config_from_argv(["--shots", "4", "--seeds", "0,1"]).shots == 4
    with pytest.raises(ConfigError, match="shots must be >= 1"):
        RunConfig(shots=0)
    plain, shot = resolve(RunConfig(**TINY)), resolve(RunConfig(**TINY, shots=2))
    assert "shots" not in plain.identity and shot.identity["shots"] == 2 and plain.hash != shot.hash
    assert "2shot" in shot.name and "2shot" in shot.seeds_name


def test_suite_without_train_split_is_refused(run_dirs, tmp_path):
    register_suite(Suite("synthetic-evalonly", reference="synth", shifts=(), train=None, val=None))
    with pytest.raises(ValueError, match="suite 'synthetic-evalonly' has no train split to draw shots from"):
        run(RunConfig(**{**TINY, "suite": "synthetic-evalonly"}, method="finetune", shots=2, **run_dirs),
            progress=False, log=lambda m: None)
    assert not any(Path(run_dirs["results_dir"]).rglob("*.json"))


def test_k_shot_run_over_seeds(run_dirs, tmp_path):
    config = RunConfig(method="finetune", method_options=QUICK, seeds=(0, 1), shots=2, **TINY, **run_dirs)
    out = run(config, progress=False, log=lambda m: None)
    tuned = {r.seed: r for r in out.records if r.candidate == "finetune"}
    assert set(tuned) == {0, 1} and all(r.shots == 2 for r in out.records)
    assert tuned[0].training["global_batch"] == 6  # FLYP's few-shot recipe: all the shots as one batch
    keys = {s: r.tags["shot_keys"] for s, r in tuned.items()}
    assert set(keys[0]) == {"train", "val"} and keys[0]["train"] != keys[1]["train"]  # each seed its own shots
    assert tuned[0].data["synth/train/2-shot"] == keys[0]["train"]  # in the data identity, so in every key
    assert "2shot" in out.name
    (board,) = build_leaderboard(out.records)
    row = next(e for e in board.entries if e.record.candidate == "finetune")
    assert row.seeds == [0, 1] and row.reference == pytest.approx(np.mean([r.reference_score for r in tuned.values()]))
    assert "finetune (2-shot) (2 seeds)" in to_markdown([board])
    assert ",0,1,2," in to_csv([board]).replace('"', "")
    checkpoints = sorted(p.name for p in (Path(run_dirs["cache_dir"]) / "checkpoints").glob("*.safetensors"))
    assert len(checkpoints) == 2  # one per seed: different shots never share a checkpoint


def test_k_above_the_training_count_writes_nothing(run_dirs):
    with pytest.raises(ShotsError, match="synth/train has fewer than 17 samples in 3 class"):
        run(RunConfig(method="finetune", method_options=QUICK, shots=17, **TINY, **run_dirs), progress=False,
            log=lambda m: None)
    assert not any(Path(run_dirs["results_dir"]).rglob("*.json"))
    assert not (Path(run_dirs["cache_dir"]) / "checkpoints").exists()


def test_every_method_read_sees_only_the_shots(run_dirs, shard_reads, monkeypatch):
    """wise-ft trains on the train shots and picks α on the val shots; the full splits are never read."""
    from robustbench_ft.methods import finetune

    trained: list[str] = []
    original = finetune.TrainingBatches

    def spy(directory, *args, **kwargs):
        trained.append(Path(directory).name)
        return original(directory, *args, **kwargs)

    monkeypatch.setattr(finetune, "TrainingBatches", spy)
    options = {"base_options": QUICK, "select_grid": "0:1:0.5"}
    out = run(RunConfig(method="wise-ft", method_options=options, shots=2, **TINY, **run_dirs), progress=False,
              log=lambda m: None)
    assert "wise-ft α chosen on val" in {r.candidate for r in out.records}
    assert [t.rsplit("-", 1)[0] for t in trained] == ["synth-train-2shot"]
    assert [d.rsplit("-", 1)[0] for d in shard_reads if "val" in d] == ["fewshot/synth-val-2shot"]
    assert "synth/train" not in shard_reads and "synth/val" not in shard_reads
