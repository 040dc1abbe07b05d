"""Damaged evaluation data (issue 8, item 3): a truncated shard, a corrupt JPEG, a non-integer label,
a manifest that disagrees with its shards (sample count, sha256). By default the run stops with an
error naming the shard (and the sample key where one sample is at fault); with
``--on-bad-sample skip`` it completes, its metrics are over the samples read, and every record
says how many samples were skipped on which dataset, in which shard, under which key."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTH_CLASSES, SYNTH_TEMPLATES, synth_image

from robustbench_ft import RunConfig, run
from robustbench_ft.cli import main
from robustbench_ft.datasets.registry import get_suite, register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.methods.resolve import resolve
from robustbench_ft.results import load_records
from robustbench_ft.shards.manifest import ShardError
from robustbench_ft.shards.writer import encode_image

DATASET = "damaged-shift"
SUITE = "synthetic-damaged"
PER_SHARD = 4
SHARDS = 3
TINY = dict(model="rbft-tiny-vit", pretrained="random", suite=SUITE, method="zeroshot", report=False)


def _register() -> None:
    try:
        get_suite(SUITE)
    except KeyError:  # a dataset users bring (no builder), so damage is never repaired behind the test's back
        register_dataset(DatasetSpec(DATASET, SYNTH_CLASSES, SYNTH_TEMPLATES))
        register_suite(Suite(SUITE, reference="synth", shifts=(DATASET,), train=("synth", "train"),
                             val=("synth", "val"), baseline=None,
                             method_defaults=get_suite("synthetic").method_defaults))


_register()


def _members(key: str, image: bytes, label: bytes) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", image), (f"{key}.cls", label)]


def write_raw_shards(directory: Path, damage: dict[str, bytes] | None = None) -> list[Path]:
    """SHARDS x PER_SHARD JPEG samples written with plain tarfile, so that any member can be made
    bad (``damage``: member name -> bytes), and a manifest that matches the files as written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    infos, paths = [], []
    for s in range(SHARDS):
        path = directory / f"{DATASET}-{s:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for j in range(PER_SHARD):
                i = s * PER_SHARD + j
                key = f"k{i:03d}"
                for name, data in _members(key, encode_image(synth_image(i % 3, rng), "jpg"), str(i % 3).encode()):
                    data = (damage or {}).get(name, data)
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        data = path.read_bytes()
        infos.append({"name": path.name, "num_samples": PER_SHARD, "size": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()})
        paths.append(path)
    manifest = {"format": "robustbench-ft-shards", "version": 1, "name": DATASET, "classes": list(SYNTH_CLASSES),
                "num_samples": SHARDS * PER_SHARD, "image_format": "jpg", "resize_shorter": None,
                "shards": infos, "metadata": {}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return paths


def _truncate(paths: list[Path]) -> None:
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _count_mismatch(paths: list[Path]) -> None:
    """The manifest moves one sample from shard 2's count to shard 1's (the total still adds up)."""
    def edit(m):
        m["shards"][1]["num_samples"] += 1
        m["shards"][2]["num_samples"] -= 1
    _edit_manifest(paths[0].parent, edit)


def _hash_mismatch(paths: list[Path]) -> None:
    """Same size, other bytes: a byte flipped inside the last image of shard 1 (tar structure intact)."""
    data = bytearray(paths[1].read_bytes())
    pos = data.rfind(b"\xff\xd9")  # the end-of-image marker of the shard's last JPEG
    data[pos - 10] ^= 0xFF
    paths[1].write_bytes(bytes(data))


# name -> (damage to members, damage to files, what the error names, samples skipped, skipped keys)
CASES = {
    "corrupt-jpeg": ({"k005.jpg": b"\xff\xd8\xff" + b"not a jpeg" * 20}, None, ["000001.tar", "'k005'"], 1, ["k005"]),
    "non-integer-label": ({"k009.cls": b"seven"}, None, ["000002.tar", "'k009'", "not an integer"], 1, ["k009"]),
    "label-out-of-range": ({"k002.cls": b"17"}, None, ["000000.tar", "'k002'", "outside"], 1, ["k002"]),
    "truncated-shard": (None, _truncate, ["000001.tar", "truncated"], None, []),
    "count-mismatch": (None, _count_mismatch, ["000001.tar", "manifest says 5"], 1, []),
    "hash-mismatch": (None, _hash_mismatch, ["000001.tar", "sha256"], PER_SHARD, []),
}


def _damaged(run_dirs: dict, case: str) -> tuple[Path, list[Path]]:
    members, files, *_ = CASES[case]
    directory = Path(run_dirs["data_root"]) / DATASET / "test"
    paths = write_raw_shards(directory, members)
    if files is not None:
        files(paths)
    return directory, paths


def test_intact_raw_shards_evaluate_completely(run_dirs):
    """The fixture's shards themselves are sound: nothing is skipped and every sample is scored."""
    _damaged(run_dirs, "corrupt-jpeg")  # then overwrite with an intact set
    write_raw_shards(Path(run_dirs["data_root"]) / DATASET / "test")
    out = run(RunConfig(**TINY, **run_dirs, on_bad_sample="skip"), progress=False, log=lambda m: None)
    assert out.records[0].skipped_samples == {}
    assert out.records[0].metrics[DATASET]["n"] == SHARDS * PER_SHARD


@pytest.mark.parametrize("case", sorted(CASES))
def test_damage_stops_the_run_naming_shard_and_key(run_dirs, case):
    _damaged(run_dirs, case)
    with pytest.raises(ShardError) as info:
        run(RunConfig(**TINY, **run_dirs), progress=False, log=lambda m: None)
    for part in CASES[case][2]:
        assert part in str(info.value)
    assert not list(Path(run_dirs["results_dir"]).rglob("*.json"))  # nothing half-scored was recorded


@pytest.mark.parametrize("case", sorted(CASES))
def test_skip_mode_completes_and_records_what_was_skipped(run_dirs, case):
    _damaged(run_dirs, case)
    logs: list[str] = []
    out = run(RunConfig(**TINY, **run_dirs, on_bad_sample="skip"), progress=False, log=logs.append)
    record = out.records[0]
    assert set(record.skipped_samples) == {DATASET}  # the intact reference lost nothing
    entry = record.skipped_samples[DATASET]
    expected = CASES[case][3]
    if expected is None:  # truncated: however many samples the cut took with it, from shard 1 only
        assert 1 <= entry["count"] <= PER_SHARD
    else:
        assert entry["count"] == expected
    assert sum(e["count"] for e in entry["events"]) == entry["count"]
    assert all(e["shard"].startswith(f"{DATASET}-") and "/" not in e["reason"] for e in entry["events"])
    assert sorted(e["key"] for e in entry["events"] if e["key"]) == CASES[case][4]
    # metrics are over the samples read
    assert record.metrics[DATASET]["n"] == SHARDS * PER_SHARD - entry["count"]
    assert record.metrics["synth"]["n"] == 24
    assert any("skipped" in m and DATASET in m for m in logs)
    assert load_records([out.record_paths[0]])[0].skipped_samples == record.skipped_samples  # stored as returned


def test_skip_mode_keeps_every_candidate_on_the_same_samples(run_dirs):
    """Cached logits (complete) and fresh ones (partial) are scored on the same rows."""
    _damaged(run_dirs, "corrupt-jpeg")
    config = RunConfig(**{**TINY, "method": "wise-ft"}, **run_dirs, on_bad_sample="skip",
                       method_options={"alpha": "0.5", "base_options": {"max_steps": 1}})
    out = run(config, progress=False, log=lambda m: None)
    assert {r.metrics[DATASET]["n"] for r in out.records} == {SHARDS * PER_SHARD - 1}


def test_skip_records_are_not_reused_by_a_strict_run(run_dirs):
    """A record that skipped samples is final only for skip mode: once the data is repaired, a default
    run scores the whole dataset again (the config hash is the same, so the checkpoint is reused)."""
    directory, _ = _damaged(run_dirs, "corrupt-jpeg")
    skipped = run(RunConfig(**TINY, **run_dirs, on_bad_sample="skip"), progress=False, log=lambda m: None)
    assert skipped.records[0].skipped_samples
    write_raw_shards(directory)  # repaired
    logs: list[str] = []
    strict = run(RunConfig(**TINY, **run_dirs), progress=False, log=logs.append)
    assert not any("reusing" in m for m in logs)
    assert strict.records[0].skipped_samples == {} and strict.records[0].metrics[DATASET]["n"] == 12
    assert resolve(strict.config).hash == resolve(skipped.config).hash


def test_cli_flag_and_report_show_skipped_samples(run_dirs, capsys, tmp_path):
    _damaged(run_dirs, "non-integer-label")
    args = ["run", "--model", "rbft-tiny-vit", "--pretrained", "random", "--suite", SUITE, "--method", "zeroshot"]
    for key in ("data_root", "cache_dir", "results_dir", "reports_dir", "workers", "eval_batch_size"):
        args += [f"--{key.replace('_', '-')}", str(run_dirs[key])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars come before it
    assert err.startswith("robustbench-ft: error: ") and "'k009'" in err and f"{DATASET}-000002.tar" in err
    assert main(args + ["--on-bad-sample", "skip"]) == 0
    page = next(Path(run_dirs["reports_dir"]).rglob("index.html")).read_text()
    assert "Unreadable samples were skipped" in page and f"{DATASET}: 1 sample(s) skipped" in page and "k009" in page
    assert main(["leaderboard", run_dirs["results_dir"], "--format", "md"]) == 0
    assert "unreadable samples left out" in capsys.readouterr().out
    assert main(args + ["--on-bad-sample", "sometimes"]) == 2
    assert "config key 'on_bad_sample' must be one of 'error', 'skip'" in capsys.readouterr().err


def test_toml_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('on_bad_sample = "skip"\n')
    assert RunConfig.from_toml(path).on_bad_sample == "skip"


def test_skip_mode_with_dataloader_workers(run_dirs):
    """Workers are separate processes: what they skip is found again in the caller, by index."""
    _damaged(run_dirs, "corrupt-jpeg")
    out = run(RunConfig(**TINY, **{**run_dirs, "workers": 2}, on_bad_sample="skip"), progress=False,
              log=lambda m: None)
    assert out.records[0].skipped_samples[DATASET]["events"][0]["key"] == "k005"


def test_a_missing_sample_that_reads_fine_afterwards_is_still_counted_and_listed(tmp_path):
    """describe_skipped trusts the pass's missing indices: a sample it can read now (a transient read
    error in a worker) is counted and listed as such, not dropped from the report."""
    from robustbench_ft.loading.shard_dataset import describe_skipped

    write_raw_shards(tmp_path)
    report = describe_skipped(tmp_path, [5])
    assert report["count"] == 1 and report["events"][0]["key"] == "k005"
    assert "readable when checked afterwards" in report["events"][0]["reason"]


def test_device_decode_path_names_shard_and_key(tmp_path):
    """The GPU path sees encoded bytes and manifest indices only; its error still names shard and key
    (the same code runs with device="cpu", libjpeg-turbo instead of nvJPEG)."""
    from robustbench_ft.evaluation.dataset_pass import evaluate
    from robustbench_ft.models import Classifier, load_clip

    write_raw_shards(tmp_path, CASES["corrupt-jpeg"][0])
    clip = load_clip("rbft-tiny-vit", "random")
    classifier = Classifier.zeroshot(clip, list(SYNTH_CLASSES), list(SYNTH_TEMPLATES))
    with pytest.raises(ShardError, match=rf"{DATASET}-000001\.tar: sample 'k005' does not decode"):
        evaluate({"zs": classifier}, tmp_path, clip.preprocess_eval, EvalOptions(batch_size=4, decode="device", progress=False))
