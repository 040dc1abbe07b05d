"""Submission bundles: submit -> leaderboard --add round trip, and malformed or hostile bundles
refused with a message that names the problem (never a traceback, nothing stored)."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest

from robustbench_ft.board.submissions import SubmissionError, make_bundle, read_bundle
from robustbench_ft.cli import main
from robustbench_ft.results import ResultRecord, load_records, write_record

SHIFTS = ["sklearn-digits", "printed-digits", "mnist-inverted", "mnist-c"]  # the demo suite's


def demo_record(i: int, alpha: float) -> ResultRecord:
    metrics = {"mnist": {"top1": 0.95 - 0.01 * i, "n": 10000, "num_skipped": 0},
               **{s: {"top1": 0.6 + 0.02 * i + 0.01 * j, "n": 1000} for j, s in enumerate(SHIFTS)}}
    return ResultRecord(record_id=f"run{i}-alpha-{alpha}", suite="demo", model="rbft-demo-vit",
                        pretrained="rbft-demo", method="wise-ft", candidate=f"my method α={alpha}",
                        reference="mnist", shifts=list(SHIFTS), metrics=metrics, tags={"alpha": alpha},
                        config={"lr": 1e-5, "epochs": 1}, config_hash=f"hash{i}")


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "my-runs"
    for i, alpha in enumerate((0.0, 0.5, 1.0)):
        write_record(demo_record(i, alpha), d / f"r{i}.json")
    return d


@pytest.fixture
def bundle_data(run_dir) -> dict:
    return make_bundle(load_records([run_dir]), name="My Method", paper="https://arxiv.org/abs/2101.00001",
                       code="https://github.com/me/my-method")


def test_submit_then_add_round_trip(tmp_path, run_dir, capsys):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"weights" * 1000)
    bundle = tmp_path / "bundle.json"
    assert main(["submit", str(run_dir), "--name", "My Method (v2)", "--paper", "https://arxiv.org/abs/2101.00001",
                 "--code", "https://github.com/me/my-method", "--checkpoint", str(ckpt), "--out", str(bundle)]) == 0
    assert "3 record(s)" in capsys.readouterr().out
    data = json.loads(bundle.read_text())
    assert data["format"] == "robustbench-ft-submission" and data["schema_version"] == 1
    assert data["method"]["checkpoint"] == {"file": "model.safetensors",
                                            "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}

    results = tmp_path / "results"
    assert main(["leaderboard", "--add", str(bundle), "--results-dir", str(results)]) == 0
    assert "accepted: 3 record(s)" in capsys.readouterr().out
    stored = load_records([results / "submissions" / "my-method-v2"])
    assert len(stored) == 3 and all(r.kind == "submitted" for r in stored)
    assert stored[0].citation == "https://arxiv.org/abs/2101.00001"
    assert stored[0].tags["submission"]["checkpoint_sha256"] == data["method"]["checkpoint"]["sha256"]
    assert not [p for p in (results / "submissions").iterdir() if p.name.startswith(".")]  # no staging left

    assert main(["leaderboard", "--results-dir", str(results), "--suite", "demo"]) == 0
    md = capsys.readouterr().out
    assert "submitted" in md and "submission My Method (v2)" in md

    assert main(["leaderboard", "--add", str(bundle), "--results-dir", str(results)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_submit_refuses_what_it_could_not_add(tmp_path, run_dir, capsys):
    assert main(["submit", str(run_dir), "--name", "../../etc", "--paper", "https://a.b/c", "--code", "https://a.b/d",
                 "--out", str(tmp_path / "b.json")]) == 2
    assert "method.name" in capsys.readouterr().err and not (tmp_path / "b.json").exists()


def _mutate(data: dict, path: str, value) -> dict:
    """Copy of ``data`` with the value at a dotted path (list indices as numbers) replaced; the
    value ``DELETE`` removes the key."""
    out = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value == "DELETE":
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return out


HTML = "<script>alert(1)</script>"
BAD_BUNDLES = [
    # (path, new value, expected part of the message)
    ("schema_version", 2, "schema_version '2' is not supported"),
    ("format", "something-else", "not a submission bundle"),
    ("method.paper", "DELETE", "missing field(s) ['paper']"),
    ("method.name", 42, "method.name: must be a string, got int"),
    ("method.code", "javascript:alert(1)", "method.code: must be an http(s) URL"),
    ("method.name", HTML, "contains '<', '>'"),
    ("method.checkpoint", {"file": "a.pt", "sha256": "xyz"}, "sha256"),
    ("records", [], "non-empty list"),
    ("records.0.metrics", "DELETE", "missing required field(s) ['metrics']"),
    ("records.0.metrics.mnist.top1", "0.9", "must be a number"),
    ("records.0.metrics.mnist.top1", 87.3, "fraction in [0, 1]"),
    ("records.0.metrics.mnist.top1", -0.1, "fraction in [0, 1]"),
    ("records.0.metrics.mnist.n", 0.5, "must be a whole number"),
    ("records.0.metrics.mnist.n", 1e300, "larger than"),
    ("records.0.shifts", "mnist-c", "field 'shifts' must be a list"),
    ("records.0.candidate", HTML, "contains '<', '>'"),
    ("records.0.tags.note", "<img src=x onerror=alert(1)>", "contains '<', '>'"),
    ("records.0.candidate", "x" * 5000, "characters long"),
    ("records.0.metrics.imagenet-x", {"top1": 0.5}, "not in suite 'demo'"),
    ("records.0.suite", "no-such-suite", "mix suites"),
    ("records.1.record_id", "run0-alpha-0.0", "appear more than once"),
    ("records.0.record_id", "../evil", "record_id"),
    ("records.0.kind", "published", "reproduced records only"),
    ("records.0.reference", "sklearn-digits", "mix reference datasets"),
    ("unexpected", 1, "unknown field(s) ['unexpected']"),
    # issue 19, second pass: what an accepted bundle could do to the board
    ("records.0.primary_metric", {"mnist": "n"}, "primary_metric['mnist'] is the count 'n'"),
    ("records.0.primary_metric", {"mnist": "num_skipped"}, "is the count 'num_skipped'"),
    ("records.0.metrics.mnist.n", 1, "top1 = 0.95 is not a whole number of the n = 1 samples"),
    ("records.0.metrics.mnist.top1", 0.33333, "top1 = 0.33333 is not a whole number of the n = 10000 samples"),
    ("records.0.summary", {"shift-avg": {"metric": "top1", "value": 0.9, "over": SHIFTS}},
     "contradicts the record's own top1"),
    ("records.0.effective_robustness", {"shift-avg": 5.0}, "must be a number in [-1, 1]"),
    ("records.0.candidate", "a\u202eb", "(here U+202E)"),
    ("records.0.candidate", "a\u2066b", "(here U+2066)"),
    ("records.0.candidate", "a\u200bb", "(here U+200B)"),
    ("records.0.candidate", "a\u0085b", "(here U+0085)"),
    ("records.0.tags.note", "a\ufeffb", "(here U+FEFF)"),
]


@pytest.mark.parametrize("path, value, message", BAD_BUNDLES, ids=[f"{p}={str(v)[:20]}" for p, v, _ in BAD_BUNDLES])
def test_malformed_bundles_are_refused_with_a_message(tmp_path, bundle_data, capsys, path, value, message):
    bundle = tmp_path / "bad.json"
    bundle.write_text(json.dumps(_mutate(bundle_data, path, value)))
    results = tmp_path / "results"
    assert main(["leaderboard", "--add", str(bundle), "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (results / "submissions").exists() or not any((results / "submissions").iterdir())


@pytest.mark.parametrize("text, message", [
    ('{"format": "robustbench-ft-submission", "schema_version": 1, "x": NaN}', "NaN"),
    ('{"format": "robustbench-ft-submission", "schema_version": 1, "x": -Infinity}', "-Infinity"),
    ('{"format": "robustbench-ft-submission", "schema_version": 1, "x": 1e999}', "too large to be finite"),
    ('{"format": "robustbench-ft-submission", "schema_version": 1, "x": ' + "9" * 400 + "}", "far too large"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"format": "robustbench-ft-submission", "schema_version": true}', "not supported"),
    ("not json at all", "not valid JSON"),
    ('{"format": "robustbench-ft-submission", "format": "robustbench-ft-submission", "schema_version": 1}',
     "the key 'format' appears twice"),
    ('["a list"]', "is a JSON object"),
])
def test_unparseable_bundles_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SubmissionError) as info:
        read_bundle(path)
    assert message in str(info.value)


def test_primary_metric_must_be_the_one_the_dataset_declares(tmp_path, bundle_data, capsys):
    """An invented metric key as primary metric once ranked an entry at 1,000,000 %."""
    bad = _mutate(_mutate(bundle_data, "records.0.metrics.mnist.made_up", 0.99), "records.0.primary_metric",
                  {"mnist": "made_up"})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(SubmissionError, match="primary metric of 'mnist' is 'made_up', but 'mnist' is scored by 'top1'"):
        read_bundle(path)


def test_a_record_that_cannot_be_scored_is_refused_on_load_not_in_the_board(tmp_path, run_dir, capsys):
    """The random CI failure (a fuzzed record with "top1": -1 on the reference loaded, then crashed
    build_leaderboard with a ValueError): records are checked when they are read."""
    data = json.loads((run_dir / "r0.json").read_text())
    data["metrics"]["mnist"]["top1"] = -1
    (run_dir / "r0.json").write_text(json.dumps(data))
    assert main(["leaderboard", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustbench-ft: error: ") and "r0.json: metrics['mnist']['top1'] must be a fraction" in err
    assert "Traceback" not in err


def test_problems_are_listed_together(tmp_path, bundle_data):
    bad = _mutate(_mutate(bundle_data, "records.0.metrics.mnist.top1", 2.0), "records.1.metrics.mnist.top1", 3.0)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(SubmissionError, match=r"2 problems\):\n  - records\[0\].*\n  - records\[1\]"):
        read_bundle(path)


def test_nan_in_a_record_is_refused_when_bundling(run_dir):
    records = load_records([run_dir])
    records[0].metrics["mnist"]["top1"] = float("nan")
    with pytest.raises(SubmissionError, match="not finite"):
        make_bundle(records, name="x", paper="https://a.b/c", code="https://a.b/d")
