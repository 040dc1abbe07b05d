"""Leaderboard: ranking, filters, effective robustness, the three formats, escaping, the shipped
published entries, and the record schema additions it relies on (summary-only records)."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from robustbench_ft.board.leaderboard import build_leaderboard
from robustbench_ft.board.render import md_escape, render, to_csv, to_html, to_markdown
from robustbench_ft.cli import main
from robustbench_ft.results import RecordError, ResultRecord, load_record, load_records, write_record
from robustbench_ft.robustness.baseline import SHIFT_AVG, Baseline
from robustbench_ft.robustness.fits import fit_linear

PUBLISHED = Path(__file__).resolve().parent.parent / "results" / "published"
IN_SHIFTS = ["imagenetv2-matched-frequency", "imagenet-r", "imagenet-sketch", "objectnet", "imagenet-a"]
HOSTILE = "<img src=x onerror=alert(1)>|*[link](javascript:x)*"


def rec(name: str, ref: float, shifts: dict[str, float], *, suite: str = "toy", model: str = "tiny",
        kind: str = "reproduced", method: str = "finetune", summary: dict | None = None,
        all_shifts: list[str] | None = None) -> ResultRecord:
    metrics = {"clean": {"top1": ref, "n": 1000}, **{s: {"top1": a, "n": 1000} for s, a in shifts.items()}}
    return ResultRecord(record_id=f"id-{name}", suite=suite, model=model, pretrained="demo", method=method,
                        candidate=name, reference="clean", shifts=["s1", "s2"] if all_shifts is None else all_shifts,
                        metrics=metrics, kind=kind, summary=summary or {}, config_hash="cafe01")


@pytest.fixture
def records() -> list[ResultRecord]:
    return [
        rec("middle", 0.80, {"s1": 0.60, "s2": 0.50}),
        rec("best", 0.70, {"s1": 0.70, "s2": 0.60}, model="other"),
        rec("worst", 0.90, {"s1": 0.40, "s2": 0.30}),
        rec("partial", 0.95, {"s1": 0.90}),                                 # no s2: unranked
        rec("reported", 0.60, {}, kind="published", method="flyp",
            summary={SHIFT_AVG: {"metric": "top1", "value": 0.62, "over": ["s1", "s2"]}}),
        rec("zoo-model", 0.85, {"s1": 0.95, "s2": 0.95}, kind="baseline"),   # the trend, not a contestant
        rec("elsewhere", 0.50, {"s1": 0.99, "s2": 0.99}, suite="toy2"),
    ]


def toy_baseline() -> Baseline:
    xs = np.linspace(0.5, 0.95, 8)
    fits = {key: fit_linear(xs, xs - 0.2, x_dataset="clean", y_dataset=key) for key in ("s1", "s2", SHIFT_AVG)}
    return Baseline("toy-trend", "toy", "logit", fits, "test", avg_shifts=["s1", "s2"])


def test_ranked_by_shift_average_with_unranked_last(records):
    boards = build_leaderboard(records)
    assert [b.suite for b in boards] == ["toy", "toy2"]
    toy = boards[0]
    names = [e.record.candidate for e in toy.entries]
    assert names == ["best", "reported", "middle", "worst", "partial"]
    assert [e.rank for e in toy.entries] == [1, 2, 3, 4, None]
    assert "zoo-model" not in names
    best = toy.entries[0]
    assert best.shift_avg == pytest.approx(0.65) and best.reference == pytest.approx(0.70)
    reported = toy.entries[1]
    assert reported.shift_avg == pytest.approx(0.62) and reported.shift_avg_reported
    assert reported.shifts == {"s1": None, "s2": None}


def test_suite_without_shifts_is_ranked_by_reference_accuracy():
    board = build_leaderboard([rec("a", 0.7, {}, suite="xfer", all_shifts=[]),
                               rec("b", 0.9, {}, suite="xfer", all_shifts=[])])[0]
    assert [(e.rank, e.record.candidate) for e in board.entries] == [(1, "b"), (2, "a")]
    assert "ranked by reference accuracy" in to_markdown([board])


def test_filters(records):
    assert [b.suite for b in build_leaderboard(records, suite="toy2")] == ["toy2"]
    only = build_leaderboard(records, model="other")
    assert [e.record.candidate for b in only for e in b.entries] == ["best"]
    assert build_leaderboard(records, suite="nope") == []


def test_effective_robustness_against_the_given_baseline(records):
    board = build_leaderboard(records, baselines={"toy": toy_baseline()})[0]
    by_name = {e.record.candidate: e for e in board.entries}
    fit = toy_baseline().fits[SHIFT_AVG]
    assert by_name["best"].er == pytest.approx(0.65 - fit.predict(0.70))
    assert by_name["reported"].er == pytest.approx(0.62 - fit.predict(0.60))  # from the reported mean
    assert by_name["partial"].er is None
    assert board.baseline == "toy-trend"
    # without a baseline, the ER stored in the record is shown, naming its baseline
    stored = rec("stored", 0.8, {"s1": 0.6, "s2": 0.6})
    stored.effective_robustness = {"baseline": "old-fit", SHIFT_AVG: 0.05}
    board = build_leaderboard([stored], baselines={"toy": None})[0]
    assert board.entries[0].er == 0.05 and board.baseline == "old-fit"


def test_markdown_escapes_user_text(records):
    records[0].candidate = HOSTILE
    md = to_markdown(build_leaderboard(records))
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert "\\|\\*\\[link\\]" in md                       # no cell break, emphasis or link
    row = next(line for line in md.splitlines() if "onerror" in line)
    assert len(re.findall(r"(?<!\\)\|", row)) == 11 + 1  # 11 columns: the hostile pipe is no cell break
    assert md_escape("a\nb") == "a b"


def test_csv_round_trips_and_defuses_formulas(records):
    records[0].candidate = "=HYPERLINK(\"http://evil\")"
    text = to_csv(build_leaderboard(records))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 6
    best = next(r for r in rows if r["record_id"] == "id-best")
    assert best["rank"] == "1" and float(best["shift_avg"]) == pytest.approx(0.65) and best["s2"] == "0.6"
    evil = next(r for r in rows if r["record_id"] == "id-middle")
    assert evil["candidate"].startswith("'=")
    assert next(r for r in rows if r["record_id"] == "id-reported")["shift_avg_reported"] == "yes"


def test_html_is_escaped_and_uses_the_report_look(records):
    records[0].candidate = HOSTILE
    records[0].method = "<script>alert(2)</script>"
    html = to_html(build_leaderboard(records), title="board <b>")
    assert "<script" not in html and "<img" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in html and "board &lt;b&gt;" in html
    assert "--accent: #1f6fb4" in html and 'id="leaderboard-1"' in html  # the shared stylesheet and table macro
    assert 'src="http' not in html and "<link" not in html


def test_published_entries_ship_marked_with_citations():
    published = load_records([PUBLISHED])
    assert len(published) == 134 and all(r.kind == "published" and r.citation for r in published)
    ids = {r.record_id: r for r in published}
    wise = ids["published-wortsman2022-wise-ft-e2e-alpha-0.5"]
    assert wise.model == "ViT-L-14-336" and wise.reference_score == pytest.approx(0.868)
    assert wise.score("imagenet-a") == pytest.approx(0.799) and wise.tags["alpha"] == 0.5
    optimal = ids["published-wortsman2022-wise-ft-e2e-optimal-alpha"]
    assert optimal.shift_mean == pytest.approx(0.774)  # the paper's own column, not the mean of per-column optima
    flyp = ids["published-goyal2023-imagenet-flyp"]
    assert set(flyp.metrics) == {"imagenet"} and flyp.summary[SHIFT_AVG]["over"] == IN_SHIFTS
    assert flyp.summary[SHIFT_AVG]["value"] == pytest.approx(0.602)
    wild = ids["published-goyal2023-iwildcam-flyp"]
    assert wild.primary_metric["iwildcam-ood"] == "macro_f1" and wild.score("iwildcam-ood") == pytest.approx(0.356)
    fmow = ids["published-goyal2023-fmow-flyp"]
    assert fmow.score("fmow-ood") == pytest.approx(0.413) and fmow.primary_metric["fmow-ood"] == "worst_region_acc"
    tpgm = ids["published-tian2023-imagenet-tpgm"]  # TPGM README: four shifts, no ObjectNet
    assert tpgm.score("imagenet-r") == pytest.approx(0.7687) and "objectnet" not in tpgm.metrics
    assert tpgm.summary["readme-avg"]["value"] == pytest.approx(0.6927) and "imagenet" in tpgm.summary["readme-avg"]["over"]
    dn = ids["published-tian2023-domainnet-rn50-tpgm"]
    assert dn.reference_score == pytest.approx(0.8241) and dn.shift_mean == pytest.approx(0.3902)
    vrf = ids["published-zhu2024-imagenet-e2e-ft-vrf"]  # VRF Table 2
    assert vrf.reference_score == pytest.approx(0.823) and vrf.score("imagenet-r") == pytest.approx(0.787)
    assert vrf.shift_mean == pytest.approx(0.618) and vrf.tags["base"] == "finetune"
    carot = ids["published-asadollahzadeh2026-imagenet-carot"]  # TRACER Table 1, its reproduction
    assert carot.score("objectnet") == pytest.approx(0.5663) and carot.metrics["imagenet"]["top1_std"] == 0.0006
    assert "TRACER" in carot.citation and carot.shift_mean == pytest.approx(0.6254)
    robust = ids["published-heuillet2025-uc-merced-convnext-base-w-laion2b-trades-fft50"]  # results_dataset.csv row 1
    assert robust.reference_score == pytest.approx(0.9523809523809523) and robust.suite == "transfer-uc-merced"
    assert robust.perturbations["linf-4/255"]["top1"] == pytest.approx(0.8) and robust.shifts == []
    assert robust.perturbations["corruptions-s3"]["top1"] == pytest.approx(0.8476190476190476)
    stock = ids["published-asadollahzadeh2026-imagenet-model-stock"]  # four shifts, no ObjectNet
    assert "objectnet" not in stock.metrics and stock.summary[SHIFT_AVG]["over"] == [
        "imagenetv2-matched-frequency", "imagenet-r", "imagenet-a", "imagenet-sketch"]
    for r in published:  # every stored number is a fraction
        assert all(0.0 <= v <= 1.0 for m in r.metrics.values() for v in m.values())


def test_cli_leaderboard_formats_and_published_next_to_reproduced(tmp_path, records, capsys):
    results = tmp_path / "results"
    for r in records[:3]:
        write_record(r, results / "run" / f"{r.record_id}.json")
    flyp = json.loads((PUBLISHED / "published-goyal2023-imagenet-flyp.json").read_text())
    (results / "published").mkdir()
    (results / "published" / "flyp.json").write_text(json.dumps(flyp))
    assert main(["leaderboard", "--results-dir", str(results)]) == 0
    md = capsys.readouterr().out
    assert "## imagenet" in md and "## toy" in md and "published" in md and "reproduced" in md
    assert "Goyal et al. 2023" in md and "60.2 †" in md
    out = tmp_path / "board.html"
    assert main(["leaderboard", str(results), "--suite", "toy", "--out", str(out)]) == 0
    assert "leaderboard: " in capsys.readouterr().out
    html = out.read_text()
    assert "imagenet" not in html.split("<h2", 1)[1] and "best" in html
    assert main(["leaderboard", str(results / "run"), "--format", "csv"]) == 0
    assert capsys.readouterr().out.count("\n") == 1 + 3  # header and three rows
    assert render([], "md").startswith("# robustbench-ft leaderboard")


def test_cli_leaderboard_bad_record_is_a_message(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**rec("x", 0.5, {}).to_dict(), "metrics": {"clean": {"top1": "high"}}}))
    assert main(["leaderboard", str(bad)]) == 2
    assert "metrics['clean']['top1'] must be a number" in capsys.readouterr().err


def test_record_schema_versions(tmp_path):
    old = rec("old", 0.5, {"s1": 0.4}).to_dict()
    del old["summary"]
    old["schema_version"] = 1
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert load_record(path).summary == {}  # version-1 files still load
    path.write_text(json.dumps({**old, "summary": {}}))
    with pytest.raises(RecordError, match="needs schema_version 2"):
        load_record(path)
    path.write_text(json.dumps({**old, "schema_version": 9}))
    with pytest.raises(RecordError, match="not supported"):
        load_record(path)
    bad_summary = {**old, "schema_version": 2, "summary": {SHIFT_AVG: {"value": 0.5}}}
    path.write_text(json.dumps(bad_summary))
    with pytest.raises(RecordError, match="summary"):
        load_record(path)
