"""Hostile files (issue 8, item 4): checkpoints that are malicious pickles run no code on any path
that reads a checkpoint, and fuzzed submission bundles and result records are either accepted or
refused with a validation error (never another exception), and never put unescaped markup into the
report, the leaderboard or its Markdown."""
from __future__ import annotations

import copy
import json
import pickle
import re
import tempfile
from pathlib import Path

import pytest
from fuzzing import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_submissions import demo_record

from robustbench_ft.board.leaderboard import build_leaderboard
from robustbench_ft.board.render import to_csv, to_html, to_markdown
from robustbench_ft.board.submissions import SubmissionError, add_bundle, make_bundle, read_bundle
from robustbench_ft.cli import main
from robustbench_ft.results import RecordError, ResultRecord, load_records, write_record

# --------------------------------------------------------------------------------------------
# Malicious pickles
# --------------------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _evil(path: Path, marker: Path) -> Path:
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"visual.conv1.weight": _Exploit(marker)}}, fh)
    return path


def _run_args(run_dirs: dict, *extra: str) -> list[str]:
    args = ["run", "--model", "rbft-tiny-vit", "--suite", "synthetic", "--no-report"]
    for key in ("data_root", "cache_dir", "results_dir", "reports_dir", "workers", "eval_batch_size"):
        args += [f"--{key.replace('_', '-')}", str(run_dirs[key])]
    return args + list(extra)


@pytest.mark.parametrize("how", ["pretrained-pt", "pretrained-bin", "pretrained-safetensors-name", "finetuned",
                                 "finetuned-with-sidecar", "import-checkpoint"])
def test_malicious_pickle_runs_no_code_on_any_path(run_dirs, tmp_path, capsys, how):
    marker = tmp_path / "pwned"
    if how.startswith("pretrained"):
        suffix = {"pretrained-pt": ".pt", "pretrained-bin": ".bin", "pretrained-safetensors-name": ".safetensors"}[how]
        args = _run_args(run_dirs, "--pretrained", str(_evil(tmp_path / f"evil{suffix}", marker)), "--method",
                         "zeroshot")
    elif how.startswith("finetuned"):
        evil = _evil(tmp_path / "evil.safetensors", marker)  # a pickle wearing a safetensors name
        if how == "finetuned-with-sidecar":
            evil.with_suffix(".json").write_text(json.dumps({
                "format": "robustbench-ft-classifier", "version": 1, "num_classes": 3, "model": "rbft-tiny-vit",
                "classnames": ["red", "green", "blue"], "templates": ["{}"]}))
        args = _run_args(run_dirs, "--pretrained", "random", "--method", "wise-ft", "--finetuned", str(evil))
    else:
        args = ["import-checkpoint", str(_evil(tmp_path / "evil.pt", marker)), str(tmp_path / "out"),
                "--model", "rbft-tiny-vit", "--suite", "synthetic"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("robustbench-ft: error: ")
    assert not marker.exists()


@pytest.mark.parametrize("sidecar", [[1, 2], {"format": "robustbench-ft-classifier", "model": 3},
                                     {"format": "robustbench-ft-classifier", "model": "no-such-model",
                                      "classnames": ["a"], "templates": ["{}"], "num_classes": 1}, "not json"])
def test_hostile_classifier_sidecar_is_refused_in_one_line(run_dirs, tmp_path, capsys, sidecar):
    weights = tmp_path / "clf.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(3, 4)}, str(weights))
    weights.with_suffix(".json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    assert main(_run_args(run_dirs, "--pretrained", "random", "--method", "wise-ft", "--finetuned", str(weights))) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("robustbench-ft: error: ")


# --------------------------------------------------------------------------------------------
# Fuzzed submission bundles
# --------------------------------------------------------------------------------------------

MARKUP = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "</td><script>x()</script>",
          "<svg onload=alert(1)>", "javascript:alert(1)", "=HYPERLINK(\"http://x\")", "$\\frac{1}{0}$", "{{ 7*7 }}",
          "{% raw %}", "\u202eevil", "\x00\x1b[31m", "../../etc/passwd", "a" * 300, ""]
TEXT = st.sampled_from(MARKUP) | st.text(max_size=20)
NUMBER = (st.integers(min_value=-10 ** 40, max_value=10 ** 40) | st.floats(allow_nan=True, allow_infinity=True)
          | st.sampled_from([0, 1, 0.0, 1.0, -0.0, 1e-300, 1e12, 1e308]))
VALUE = st.recursive(st.none() | st.booleans() | NUMBER | TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                     max_leaves=6)
UNKNOWN_DATASETS = st.sampled_from(["imagenet", "no-such-dataset", "<script>", "mnist-c ", "MNIST"])


def _base_bundle() -> dict:
    return make_bundle([demo_record(i, a) for i, a in enumerate((0.0, 0.5, 1.0))], name="My Method",
                       paper="https://arxiv.org/abs/2101.00001", code="https://github.com/me/my-method")


BASE = _base_bundle()


def _paths(node, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


PATHS = _paths(BASE)[1:]


def _mutate(draw, base: dict, paths: list[tuple], extra_ops: dict | None = None) -> dict:
    """A deep copy of ``base`` with 1-3 random mutations: replace a value (with anything from VALUE),
    delete a key, or one of ``extra_ops`` (name -> function(draw, data))."""
    data = copy.deepcopy(base)
    ops = ["replace", "replace", "delete", *(extra_ops or {})]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            op = draw(st.sampled_from(ops))
            if op == "replace":
                parent[path[-1]] = draw(VALUE)
            elif op == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            elif op in (extra_ops or {}):
                extra_ops[op](draw, data)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or retyped this path
    return data


def _add_unknown_dataset(draw, data: dict) -> None:
    record = data["records"][draw(st.integers(0, len(data["records"]) - 1))]
    record["metrics"][draw(UNKNOWN_DATASETS)] = {"top1": draw(NUMBER), "n": draw(NUMBER)}


@st.composite
def mutated_bundles(draw) -> dict:
    return _mutate(draw, BASE, PATHS, {"add-dataset": _add_unknown_dataset})


def _assert_no_markup(text: str) -> None:
    """No payload tag arrives as markup (the report's own <img> figures are not payloads)."""
    assert not re.search(r"<script|<img src=x|<svg onload", text, re.IGNORECASE)


def _check_renderings(results: Path, report: bool = False) -> None:
    records = load_records([results])
    boards = build_leaderboard(records)
    rendered = [to_html(boards), to_markdown(boards)]
    if report:
        from robustbench_ft.report import render_report

        rendered.append(render_report(records, results / "report", n_boot=5).read_text())
    for text in rendered:
        _assert_no_markup(text)
    to_csv(boards)


@settings(max_examples=examples(80), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_bundles())
def test_fuzzed_bundles_are_accepted_or_refused_with_a_message(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle.json"
        path.write_text(json.dumps(data, allow_nan=True))
        try:
            read_bundle(path)
        except SubmissionError as exc:
            assert "submission" in str(exc) or str(path) in str(exc)
            return
        results = Path(tmp) / "results"
        add_bundle(path, results)
        _check_renderings(results)


def test_unmutated_bundle_is_accepted_and_rendered(tmp_path):
    """The fuzzer's starting point is valid, so its refusals come from its mutations."""
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(BASE))
    assert len(add_bundle(path, tmp_path / "results")) == 3
    _check_renderings(tmp_path / "results")


# --------------------------------------------------------------------------------------------
# Fuzzed result records (a results directory holds files from anywhere)
# --------------------------------------------------------------------------------------------

RECORD_BASE = demo_record(0, 0.5).to_dict()
RECORD_PATHS = _paths(RECORD_BASE)[1:]


@st.composite
def mutated_records(draw) -> dict:
    return _mutate(draw, RECORD_BASE, RECORD_PATHS)


@settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_records(), st.sampled_from(MARKUP[:4]))
def test_fuzzed_records_load_or_fail_with_record_error_and_render_escaped(data, markup):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.json"
        path.write_text(json.dumps(data, allow_nan=True))
        try:
            record = load_records([path])[0]
        except RecordError:
            return
        record.candidate = markup  # and markup in the one field every rendering shows
        write_record(record, path)
        _check_renderings(Path(tmp), report=True)


def test_dataset_without_its_primary_metric_is_refused():
    """Found by the record fuzzer: {"metrics": {"shift": {}}} loaded, then every table raised KeyError."""
    data = copy.deepcopy(RECORD_BASE)
    data["metrics"]["mnist-c"] = {"n": 1000}
    with pytest.raises(RecordError, match=r"metrics\['mnist-c'\] has no 'top1'"):
        ResultRecord.from_dict(data)
    bundle = copy.deepcopy(BASE)
    bundle["records"][0]["metrics"]["mnist-c"] = {}
    with pytest.raises(SubmissionError, match="has no 'top1'"):
        from robustbench_ft.board.submissions import validate_bundle

        validate_bundle(bundle)


def test_markup_in_every_string_is_escaped_in_report_and_leaderboard(tmp_path):
    from robustbench_ft.report import render_report

    payload = "<script>alert(1)</script>"
    records = []
    for i, alpha in enumerate((0.0, 0.5, 1.0)):
        r = demo_record(i, alpha)
        r.candidate, r.method, r.model, r.pretrained, r.citation = (payload + str(i),) * 5
        r.tags = {"alpha": alpha, "curve": payload, payload: payload}
        r.config = {payload: payload, "nested": {payload: [payload]}}
        r.versions = {payload: payload}
        r.skipped_samples = {"mnist": {"count": 1, "events": [{"shard": payload, "key": payload, "count": 1,
                                                                "reason": payload}]}}
        records.append(r)
    page = render_report(records, tmp_path / "report", n_boot=20).read_text()
    boards = build_leaderboard(records)
    for text in (page, to_html(boards), to_markdown(boards)):
        assert "<script" not in text
    assert "&lt;script&gt;" in page


def test_malicious_training_state_in_the_cache_runs_no_code(run_dirs, tmp_path):
    """The resumable training state is a torch pickle in the cache: read weights-only, a hostile one
    is set aside and training starts over."""
    from robustbench_ft import RunConfig, run
    from robustbench_ft.datasets.build import data_identity, prepare_suite
    from robustbench_ft.methods.context import MethodContext
    from robustbench_ft.methods.resolve import resolve

    config = RunConfig(model="rbft-tiny-vit", pretrained="random", suite="synthetic", report=False,
                       method="finetune", method_options={"max_steps": 2}, **run_dirs)
    resolved = resolve(config)
    prepare_suite(resolved.suite, Path(config.data_root), log=lambda m: None)  # the data is part of the key
    data = data_identity(resolved.suite, Path(config.data_root))
    stem = MethodContext(resolved, None, data).checkpoint_path  # type: ignore[arg-type]
    stem.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    _evil(stem.with_suffix(".training.pt"), marker)
    logs: list[str] = []
    out = run(config, progress=False, log=logs.append)
    assert any("ignoring unreadable training state" in m for m in logs)  # the file was read, and refused
    assert out.records[0].candidate == "finetune" and not marker.exists()
