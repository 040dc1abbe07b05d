"""Streaming evaluation: a suite's shards at a URL, each shard hash-checked as it streams, nothing unverified kept."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from http_fixtures import Faults, serve

from robustbench_ft import RunConfig, run
from robustbench_ft.cli import main
from robustbench_ft.config import ConfigError
from robustbench_ft.evaluation import evaluate
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.loading.shard_dataset import worker_errors
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.models.clip import load_clip
from robustbench_ft.results import load_records
from robustbench_ft.shards.manifest import Manifest, ShardError

TINY = dict(model="rbft-tiny-vit", pretrained="random", method="zeroshot", suite="synthetic", report=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The synthetic suite's data, built once (a zero-shot run builds every split it reads)."""
    root = tmp_path_factory.mktemp("stream")
    run(RunConfig(**TINY, data_root=str(root / "data"), cache_dir=str(root / "cache0"),
                  results_dir=str(root / "results0"), workers=0, eval_batch_size=16), progress=False, log=lambda m: None)
    return root / "data"


def _config(tmp_path: Path, base: str, **kw) -> RunConfig:
    urls = {name: f"{base}/{name}/test" for name in ("synth", "synth-inverted")}
    return RunConfig(**TINY, data_root=str(tmp_path / "local"), data_urls=urls, cache_dir=str(tmp_path / "cache"),
                     results_dir=str(tmp_path / "results"), workers=0, eval_batch_size=16, **kw)


def test_streamed_logits_equal_local_ones_in_any_split(built):
    clip = load_clip("rbft-tiny-vit", "random")
    clf = Classifier.zeroshot(clip, ("red", "green", "blue"), ("a photo of {}.",))
    local = evaluate({"zs": clf}, built / "synth" / "test", clip.preprocess_eval, EvalOptions(progress=False))
    with serve(built) as url:
        for workers in (0, 2):
            streamed = evaluate({"zs": clf}, f"{url}/synth/test", clip.preprocess_eval,
                                EvalOptions(workers=workers, progress=False, batch_size=5), keep_meta=True)
            np.testing.assert_array_equal(streamed.labels, local.labels)
            np.testing.assert_allclose(streamed.logits["zs"], local.logits["zs"], rtol=1e-5, atol=1e-6)


def test_a_run_streams_its_eval_sets_and_records_the_same_scores(built, tmp_path):
    local = run(RunConfig(**TINY, data_root=str(built), cache_dir=str(tmp_path / "c1"),
                          results_dir=str(tmp_path / "r1"), workers=0, eval_batch_size=16), progress=False,
                log=lambda m: None).records[0]
    with serve(built) as url:
        streamed = run(_config(tmp_path, url), progress=False, log=lambda m: None).records[0]
    assert streamed.metrics == local.metrics and streamed.data == local.data  # the data is named by content
    assert streamed.config["data_urls"]["synth"].startswith("http://127.0.0.1:")
    assert not (tmp_path / "local" / "synth" / "test").exists()  # nothing was built or stored for the streamed sets


@pytest.mark.parametrize("fault", ["flip", "truncate"])
def test_a_damaged_or_dropped_shard_is_named_and_nothing_is_cached_or_recorded(built, tmp_path, capsys, fault):
    shard = Manifest.load(built / "synth-inverted" / "test").shards[1].name
    faults = Faults(**{fault: {f"synth-inverted/test/{shard}": 2000}})
    with serve(built, faults) as url:
        config = _config(tmp_path, url)
        with pytest.raises(ShardError) as err:
            run(config, progress=False, log=lambda m: None)
        message = str(err.value)
        assert shard in message and "\n" not in message
        assert ("does not match its manifest" in message) if fault == "flip" else ("reading failed after" in message)
        assert not list(Path(config.results_dir).rglob("*.json"))
        cached = {p.name for p in (tmp_path / "cache" / "logits").rglob("*.npy")}
        assert len(cached) == 2  # synth's verified pass (logits + labels); none of synth-inverted
        args = ["run", "--model", "rbft-tiny-vit", "--pretrained", "random", "--method", "zeroshot", "--suite",
                "synthetic", "--no-report", "--workers", "0", "--data-root", str(tmp_path / "local"),
                "--cache-dir", str(tmp_path / "cache2"), "--results-dir", str(tmp_path / "r2"), "--data-urls",
                ",".join(f"{k}={v}" for k, v in config.data_urls.items())]
        assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("robustbench-ft: error")]
    assert len(errors) == 1 and shard in errors[0] and not list((tmp_path / "r2").rglob("*.json"))


def test_data_urls_are_typed_and_checked_before_any_work(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('[data_urls]\nsynth = 5\n')
    with pytest.raises(ConfigError, match=r"config key 'data_urls.synth' must be a string, got int 5"):
        RunConfig.from_toml(path)
    base = ["run", "--model", "rbft-tiny-vit", "--pretrained", "random", "--method", "zeroshot", "--suite",
            "synthetic", "--no-report", "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
            "--data-root", str(tmp_path / "d")]
    for urls, message in [("synht=http://127.0.0.1:9/x", "data_urls names unknown dataset(s) ['synht']"),
                          ("synth=pipe:cat x", "evaluation streams shards from http://, https:// or file://"),
                          ("synth", "must be name=value pairs")]:
        assert main([*base, "--data-urls", urls]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_url_data_root_streams_zero_shot_but_training_needs_local_data(built, tmp_path):
    with serve(built) as url:
        dirs = dict(cache_dir=str(tmp_path / "c"), results_dir=str(tmp_path / "r"), workers=0, eval_batch_size=16)
        outcome = run(RunConfig(**TINY, data_root=url, **dirs), progress=False, log=lambda m: None)
        assert len(load_records([outcome.records_dir])) == 1
        with pytest.raises(ValueError, match="is a URL, but method 'finetune' reads the train split"):
            run(RunConfig(**{**TINY, "method": "finetune"}, data_root=url, **dirs), progress=False, log=lambda m: None)
        missing = RunConfig(**TINY, data_root=f"{url}/nowhere", **dirs)
        with pytest.raises(ShardError, match=r"no manifest.json at http://127\.0\.0\.1:\d+/nowhere/synth/test"):
            run(missing, progress=False, log=lambda m: None)


def test_a_worker_error_reaches_the_user_as_its_own_line():
    # PyTorch re-raises a DataLoader worker's exception with the worker's traceback as its text (a
    # DataLoader that stops on an error also waits 5 s per worker to shut down, so this is not run end to end)
    wrapped = ShardError("Caught ShardError in DataLoader worker process 1.\nOriginal Traceback (most recent call "
                         "last):\n  File ...\nrobustbench_ft.shards.manifest.ShardError: streamed shard X is bad\n")
    with pytest.raises(ShardError) as err, worker_errors():
        raise wrapped
    assert str(err.value) == "streamed shard X is bad"
