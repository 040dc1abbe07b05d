"""The ImageNet baseline from an imagenet-testbed table: a synthetic robustness_top1s.csv with the
real layout, the shipped coefficients, and class-subset x values in effective robustness."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import special

from robustbench_ft.cli import main
from robustbench_ft.metrics import subset_key
from robustbench_ft.results import ResultRecord
from robustbench_ft.robustness.baseline import SHIFT_AVG, load_baseline
from robustbench_ft.robustness.effective import compute_effective_robustness
from robustbench_ft.robustness.testbed import TESTBED_SHIFTS, fit_testbed_baseline, read_testbed_csv

# true logit-space trends, shift -> (slope, intercept); x is the column TESTBED_SHIFTS names. ImageNet-A
# is piecewise, split at 91.86 % on its classes as the testbed fits it: a line below the pivot, another above.
TRUE = {"imagenetv2-matched-frequency": (0.9, -0.5), "imagenet-r": (0.6, -2.0), "imagenet-sketch": (1.1, -2.4),
        "objectnet": (1.0, -1.9), "imagenet-a": (2.0, -7.7)}
TRUE_A_PIECES = ((0.7, -5.1), (3.0, -10.3))
PIVOT_A = 0.9186
COLUMNS = ["model", "greyscale", "imagenet-a", "imagenet-r", "imagenet-sketch", "imagenetv2-matched-frequency",
           "imagenetv2-matched-frequency-format-val", "objectnet-1.0-beta", "val", "val-on-imagenet-a-classes",
           "val-on-imagenet-r-classes", "val-on-objectnet-classes"]
STANDARD = [f"resnet{i}" for i in range(12)]


def expit_pct(z: float) -> float:
    return float(100 * special.expit(z))


def write_table(path, *, extra_rows: list[dict] = ()) -> None:
    """12 standard models exactly on the TRUE lines, a far-off 'more data' model that must be
    ignored, a low-accuracy standard model below the testbed's plot cut-off, and an aws variant."""
    rows = []
    for i, name in enumerate(STANDARD):
        val = 0.60 + 0.02 * i
        row = {"model": name, "val": 100 * val, "greyscale": 100 * val - 3}
        for shift, cols in TESTBED_SHIFTS.items():
            x = 0.78 + 0.015 * i if cols.subset else val  # subset columns: above the 75 % cut-off
            slope, intercept = TRUE[shift]
            if shift == "imagenet-a":  # 6 models on each side of the pivot
                x = 0.80 + 0.02 * i if i < 6 else 0.925 + 0.008 * (i - 6)
                slope, intercept = TRUE_A_PIECES[x > PIVOT_A]
            row[cols.x] = 100 * x
            row[cols.y] = expit_pct(slope * special.logit(x) + intercept)
        row["imagenetv2-matched-frequency"] = row["imagenetv2-matched-frequency-format-val"] - 1  # not the fitted column
        rows.append(row)
    rows.append({**rows[3], "model": "clip_zeroshot_more_data", "imagenet-r": 95.0, "imagenet-sketch": 90.0})
    rows.append({**rows[0], "model": "resnet_low", "val": 40.0, "val-on-imagenet-r-classes": 50.0,
                 "val-on-imagenet-a-classes": 50.0, "val-on-objectnet-classes": 45.0, "imagenet-sketch": 99.0,
                 "imagenet-r": 99.0, "imagenet-a": 99.0, "objectnet-1.0-beta": 99.0})
    rows.append({**rows[5], "model": "resnet50_aws_baseline", "imagenet-sketch": 1.0})
    # resnet50 sits at the pivot with 0 % on ImageNet-A (the set was filtered against it): the testbed drops it
    rows.append({**rows[4], "model": "resnet50", "val-on-imagenet-a-classes": 100 * PIVOT_A, "imagenet-a": 0.0})
    rows += list(extra_rows)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "robustness_top1s.csv"
    write_table(path)
    return path


STANDARD_LIST = [*STANDARD, "resnet_low", "resnet50_aws_baseline", "resnet50"]


def test_fit_recovers_the_lines_from_standard_models_only(table):
    baseline = fit_testbed_baseline(table, standard=STANDARD_LIST)
    assert baseline.suite == "imagenet" and baseline.reference == "imagenet"
    assert set(baseline.fits) == {*TRUE, SHIFT_AVG}
    for shift, (slope, intercept) in TRUE.items():
        fit = baseline.fits[shift]
        pieces = fit.pieces if shift == "imagenet-a" else (fit,)
        truths = TRUE_A_PIECES if shift == "imagenet-a" else ((slope, intercept),)
        for piece, (s, b) in zip(pieces, truths, strict=True):
            assert piece.slope == pytest.approx(s, abs=1e-4) and piece.intercept == pytest.approx(b, abs=1e-4)
        assert fit.x_metric == (subset_key(shift) if TESTBED_SHIFTS[shift].subset else "")
        # not the more-data model, the low one or the aws variant; resnet50 everywhere but on ImageNet-A
        expected_models = sorted(STANDARD) if shift == "imagenet-a" else sorted([*STANDARD, "resnet50"])
        assert baseline.points[shift].models == expected_models and fit.n == len(expected_models)
    assert baseline.fits[SHIFT_AVG].x_metric == "" and baseline.avg_shifts == list(TESTBED_SHIFTS)


def test_cli_prints_coefficients_and_stores_a_loadable_baseline(table, tmp_path, capsys):
    listing = tmp_path / "standard.txt"
    listing.write_text("# standard-training models\n" + "\n".join(STANDARD_LIST) + "\n")
    out = tmp_path / "testbed.json"
    assert main(["baseline", "fit", "--testbed", str(table), "--standard-models", str(listing),
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["imagenet-r"]["slope"] == pytest.approx(0.6, abs=1e-4)
    assert printed["imagenet-r"]["x"] == "top1@imagenet-r" and printed["imagenet-r"]["n"] == len(STANDARD) + 1
    assert printed["imagenet-a"]["pivots"] == [PIVOT_A] and [p["n"] for p in printed["imagenet-a"]["pieces"]] == [6, 6]
    loaded = load_baseline(out)
    assert loaded.fits["objectnet"].slope == pytest.approx(1.0, abs=1e-4)
    assert loaded.fits["imagenet-a"] == fit_testbed_baseline(table, standard=STANDARD_LIST).fits["imagenet-a"]


def test_imagenet_a_trend_gives_the_testbeds_predictions_on_both_sides_of_its_pivot(table):
    """The testbed's own procedure (paper_imagenet_a.py): scipy.stats.linregress in logit space on each
    side of 91.86 %, resnet50 out; our piecewise fit predicts what its two lines predict just below and
    above the pivot (where the testbed's lines do not meet, neither do ours)."""
    from scipy import stats

    rows = read_testbed_csv(table)
    cols = TESTBED_SHIFTS["imagenet-a"]
    pts = [(r[cols.x], r[cols.y]) for m, r in rows.items()
           if m in STANDARD and r.get(cols.x, 0) >= 0.75]
    lines = [stats.linregress([special.logit(x) for x, y in side], [special.logit(y) for x, y in side])
             for side in ([p for p in pts if p[0] < PIVOT_A], [p for p in pts if p[0] > PIVOT_A])]
    fit = fit_testbed_baseline(table, standard=STANDARD_LIST).fits["imagenet-a"]
    for x, line in ((PIVOT_A - 1e-6, lines[0]), (PIVOT_A + 1e-6, lines[1]), (0.85, lines[0]), (0.96, lines[1])):
        expected = special.expit(line.slope * special.logit(x) + line.intercept)
        assert fit.predict(x) == pytest.approx(expected, abs=1e-6)
    jump = fit.predict(PIVOT_A + 1e-9) - fit.predict(PIVOT_A - 1e-9)
    testbed_jump = (special.expit(lines[1].slope * special.logit(PIVOT_A) + lines[1].intercept)
                    - special.expit(lines[0].slope * special.logit(PIVOT_A) + lines[0].intercept))
    assert jump == pytest.approx(testbed_jump, abs=1e-6) and abs(jump) > 0.01


def test_a_piecewise_fit_is_continuous_where_its_data_is():
    """Points on one broken line that is continuous at the pivot give pieces that meet there."""
    from robustbench_ft.robustness.fits import fit_piecewise

    pivot = 0.7
    zp = special.logit(pivot)
    below = np.linspace(0.5, 0.68, 8)
    above = np.linspace(0.72, 0.95, 8)
    ys = [special.expit(0.5 * (special.logit(x) - zp) - 1.0) for x in below]
    ys += [special.expit(2.0 * (special.logit(x) - zp) - 1.0) for x in above]
    fit = fit_piecewise(np.r_[below, above], ys, "logit", (pivot,))
    assert fit.predict(pivot - 1e-9) == pytest.approx(fit.predict(pivot + 1e-9), abs=1e-6)
    assert [p.slope for p in fit.pieces] == [pytest.approx(0.5), pytest.approx(2.0)]


@pytest.mark.parametrize("content, match", [
    ("name,val\nresnet18,70\n", "no 'model' column"),
    ("model,val\nresnet18,seventy\n", "line 2, column 'val'.*not a number"),
    ("model,val\nresnet18,170\n", "not a percentage"),
    ("model,val\nresnet18,70\nresnet18,71\n", "appears twice"),
    ("model,val,imagenet-r\nsomething_else,70,30\n", "none of its models is a standard-training model"),
])
def test_bad_tables_are_refused_with_the_place_named(tmp_path, content, match):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        fit_testbed_baseline(path)


def test_cli_error_is_a_message_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_text("model,val\nresnet18,nan%\n")
    assert main(["baseline", "fit", "--testbed", str(path)]) == 2
    assert "not a number" in capsys.readouterr().err


def test_reader_keeps_fractions_and_skips_empty_cells(table):
    rows = read_testbed_csv(table)
    assert rows["resnet0"]["val"] == pytest.approx(0.60)
    path = table.parent / "sparse.csv"
    path.write_text("model,val,imagenet-r\nresnet18,69.758,\n")
    assert read_testbed_csv(path) == {"resnet18": {"val": pytest.approx(0.69758)}}


def test_shipped_imagenet_testbed_baseline():
    """The coefficients derived from the real table (commit 0170eec of modestyachts/imagenet-testbed)."""
    baseline = load_baseline("imagenet-testbed")
    assert baseline.suite == "imagenet" and set(baseline.fits) == {*TRUE, SHIFT_AVG}
    v2 = baseline.fits["imagenetv2-matched-frequency"]
    assert v2.slope == pytest.approx(0.923, abs=1e-3) and v2.r > 0.99 and v2.n >= 80
    # ImageNet-A as the testbed fits it: two pieces split at 91.86 %, resnet50 excluded (an independent
    # recomputation from the same table gave n = 33 / 51, slope 0.689 / 2.956, intercept -5.140 / -10.277)
    a = baseline.fits["imagenet-a"]
    assert a.pivots == (0.9186,) and [p.n for p in a.pieces] == [33, 51]
    assert [p.slope for p in a.pieces] == [pytest.approx(0.6894, abs=1e-3), pytest.approx(2.9560, abs=1e-3)]
    assert [p.intercept for p in a.pieces] == [pytest.approx(-5.1400, abs=1e-3), pytest.approx(-10.2774, abs=1e-3)]
    assert "resnet50" not in baseline.points["imagenet-a"].models
    assert baseline.fits["imagenet-r"].x_metric == "top1@imagenet-r"
    # a ResNet-50-like model (76.1 % ImageNet) sits near 63 % on ImageNetV2, as the testbed reports
    assert v2.predict(0.761) == pytest.approx(0.632, abs=0.02)


def test_effective_robustness_uses_the_class_subset_reference_accuracy():
    baseline = load_baseline("imagenet-testbed")
    metrics = {"imagenet": {"top1": 0.80, subset_key("imagenet-r"): 0.90},
               "imagenet-r": {"top1": 0.70}, "imagenet-a": {"top1": 0.30}}
    record = ResultRecord("r", "imagenet", "ViT-B-16", "openai", "finetune", "ft", "imagenet",
                          list(TRUE), metrics)
    er = compute_effective_robustness(record, baseline)
    expected = 0.70 - baseline.fits["imagenet-r"].predict(0.90)
    assert er["per_shift"]["imagenet-r"] == pytest.approx(expected)
    assert "imagenet-a" in er["missing"]  # no ImageNet accuracy on ImageNet-A's classes: no ER, not a wrong one
    assert not np.isnan(expected)


def test_baseline_records_with_subset_accuracy_are_fitted_on_it():
    """Record-based baselines follow the same rule: x is the class-subset reference accuracy where
    every baseline model reports it (as ``evaluate`` stores ``top1@<shift>``)."""
    from robustbench_ft.robustness.baseline import Baseline

    xs = np.linspace(0.6, 0.9, 6)
    records = [ResultRecord(f"b{i}", "imagenet", "m", "p", "erm", f"b{i}", "imagenet", ["imagenet-r"],
                            {"imagenet": {"top1": float(x) - 0.1, "n": 50000, "top1@imagenet-r": float(x),
                                          "n@imagenet-r": 10000},
                             "imagenet-r": {"top1": float(special.expit(0.6 * special.logit(x) - 2.0))}},
                            kind="baseline") for i, x in enumerate(xs)]
    fit = Baseline.from_records(records, "toy").fits["imagenet-r"]
    assert fit.x_metric == "top1@imagenet-r"
    assert fit.slope == pytest.approx(0.6) and fit.intercept == pytest.approx(-2.0)
