"""Axis transforms, baseline fits, bootstrap bands and effective robustness."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import special, stats

from robustbench_ft.results import ResultRecord, write_record
from robustbench_ft.robustness.axes import DEFAULT_EPS, TRANSFORMS, inverse_transform, transform
from robustbench_ft.robustness.baseline import (
    SHIFT_AVG,
    Baseline,
    load_baseline,
)
from robustbench_ft.robustness.baseline import (
    baseline_records as baseline_records_of,
)
from robustbench_ft.robustness.effective import attach_effective_robustness, effective_robustness
from robustbench_ft.robustness.fits import LinearFit, bootstrap_band, fit_linear

SHIFTS = ["shift-a", "shift-b"]
# true trends in logit space: logit(y) = slope * logit(x) + intercept
TRUE = {"shift-a": (0.8, -0.5), "shift-b": (1.1, -1.0)}


def make_record(name: str, ref: float, shifts: dict[str, float], kind: str = "baseline",
                suite: str = "toy", n: int = 1000) -> ResultRecord:
    metrics = {"ref": {"top1": ref, "n": n}, **{s: {"top1": a, "n": n} for s, a in shifts.items()}}
    return ResultRecord(record_id=name, suite=suite, model="m", pretrained="p", method="erm",
                        candidate=name, reference="ref", shifts=list(shifts), metrics=metrics, kind=kind)


def on_line(x: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return special.expit(slope * special.logit(x) + intercept)


@pytest.fixture
def baseline_records() -> list[ResultRecord]:
    xs = np.linspace(0.3, 0.9, 12)
    return [make_record(f"b{i}", float(x), {s: float(on_line(x, *TRUE[s])) for s in SHIFTS})
            for i, x in enumerate(xs)]


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_transforms_invert(kind):
    acc = np.linspace(0.01, 0.99, 50)
    np.testing.assert_allclose(inverse_transform(transform(acc, kind), kind), acc, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["logit", "probit"])
def test_zero_and_one_are_finite_and_clipped(kind):
    z = transform([0.0, 1.0], kind)
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(inverse_transform(z, kind), [DEFAULT_EPS, 1 - DEFAULT_EPS])
    # half a sample when the test-set size is known
    np.testing.assert_allclose(inverse_transform(transform([0.0, 1.0], kind, n=200), kind), [0.0025, 0.9975])
    # interior values are untouched by clipping
    assert transform(0.5, kind, n=10) == pytest.approx(0.0)


def test_logit_matches_log_odds():
    assert transform(0.8, "logit") == pytest.approx(np.log(0.8 / 0.2))
    assert transform(0.975, "probit") == pytest.approx(1.959964, abs=1e-6)


def test_fit_recovers_line_exactly():
    x = np.linspace(0.2, 0.95, 9)
    fit = fit_linear(x, on_line(x, 0.7, -0.3), "logit", x_dataset="ref", y_dataset="s")
    assert fit.slope == pytest.approx(0.7, abs=1e-12)
    assert fit.intercept == pytest.approx(-0.3, abs=1e-12)
    assert fit.r == pytest.approx(1.0)
    assert fit.n == 9
    np.testing.assert_allclose(fit.predict(x), on_line(x, 0.7, -0.3), atol=1e-12)
    assert isinstance(fit.predict(0.5), float)


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_fit_agrees_with_scipy_linregress(kind):
    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 0.9, 30)
    y = np.clip(x - 0.2 + rng.normal(0, 0.03, 30), 0.01, 0.99)
    fit = fit_linear(x, y, kind)
    ref = stats.linregress(transform(x, kind), transform(y, kind))
    assert fit.slope == pytest.approx(ref.slope, rel=1e-10)
    assert fit.intercept == pytest.approx(ref.intercept, rel=1e-10, abs=1e-12)
    assert fit.r == pytest.approx(ref.rvalue, rel=1e-10)


def test_effective_robustness_zero_on_line_positive_above():
    x = np.linspace(0.3, 0.9, 6)
    fit = fit_linear(x, on_line(x, 1.0, -0.8))
    for acc in (0.35, 0.6, 0.85):
        on = float(on_line(acc, 1.0, -0.8))
        assert effective_robustness(fit, acc, on) == pytest.approx(0.0, abs=1e-12)
        assert effective_robustness(fit, acc, on + 0.05) == pytest.approx(0.05)
        assert effective_robustness(fit, acc, on - 0.02) < 0
    # accuracies of exactly 0 and 1 still give a number
    assert np.isfinite(effective_robustness(fit, 1.0, 1.0))
    assert np.isfinite(effective_robustness(fit, 0.0, 0.0))


def test_bootstrap_band_contains_fit_and_narrows():
    rng = np.random.default_rng(0)
    grid = np.linspace(0.4, 0.8, 9)

    def band_width(n: int) -> np.ndarray:
        x = rng.uniform(0.3, 0.9, n)
        y = special.expit(0.9 * special.logit(x) - 0.4 + rng.normal(0, 0.15, n))
        lo, hi = bootstrap_band(x, y, "logit", grid, n_boot=500)
        line = fit_linear(x, y).predict(grid)
        assert np.all(lo <= line) and np.all(line <= hi)
        return hi - lo

    assert np.all(band_width(200) < band_width(10))
    # reproducible with the same seed
    x = np.linspace(0.3, 0.9, 8)
    y = on_line(x, 1, 0) + np.linspace(-0.02, 0.02, 8)
    a = bootstrap_band(x, y, "logit", grid, n_boot=100, seed=3)
    b = bootstrap_band(x, y, "logit", grid, n_boot=100, seed=3)
    np.testing.assert_array_equal(a[0], b[0])


def test_baseline_from_records(baseline_records):
    others = [make_record("zs", 0.6, {"shift-a": 0.6, "shift-b": 0.5}, kind="reproduced")]
    base = Baseline.from_records(baseline_records + others, "toy-baseline", "logit", citation="Taori 2020")
    assert base.reference == "ref" and base.suite == "toy"
    assert base.shifts == SHIFTS
    assert base.avg_shifts == SHIFTS
    for s, (slope, intercept) in TRUE.items():
        assert base.fits[s].slope == pytest.approx(slope, abs=1e-9)
        assert base.fits[s].intercept == pytest.approx(intercept, abs=1e-9)
        assert base.fits[s].n == 12
    avg = base.fits[SHIFT_AVG]
    assert avg.n == 12 and avg.y_dataset == SHIFT_AVG
    # the avg fit is fitted to the mean of the shifts, so a baseline model is close to it
    r0 = baseline_records[4]
    mean_y = np.mean([r0.score(s) for s in SHIFTS])
    assert avg.predict(r0.reference_score) == pytest.approx(mean_y, abs=0.01)
    lo, hi = base.band("shift-a", [0.5, 0.7], n_boot=50)
    assert np.all(lo <= hi)


def test_baseline_skips_sparse_shift(baseline_records):
    # one extra shift reported by only two baseline models: no fit, warning, and not in the average
    for r in baseline_records[:2]:
        r.metrics["rare"] = {"top1": 0.3, "n": 1000}
        r.shifts.append("rare")
    with pytest.warns(UserWarning, match="rare"):
        base = Baseline.from_records(baseline_records, "b")
    assert "rare" not in base.fits and base.avg_shifts == SHIFTS


def test_attach_effective_robustness(baseline_records):
    base = Baseline.from_records(baseline_records, "toy-baseline")
    acc_ref = 0.7
    above = {s: float(on_line(acc_ref, *TRUE[s])) + 0.04 for s in SHIFTS}
    rec = make_record("cand", acc_ref, {**above, "unfitted": 0.5}, kind="reproduced")
    attach_effective_robustness(rec, base)
    er = rec.effective_robustness
    assert er["baseline"] == "toy-baseline" and er["transform"] == "logit"
    assert er["per_shift"] == pytest.approx({s: 0.04 for s in SHIFTS}, abs=1e-9)
    assert er["mean_per_shift"] == pytest.approx(0.04, abs=1e-9)
    assert er[SHIFT_AVG] > 0
    assert er["missing"] == ["unfitted"]
    json.dumps(er, allow_nan=False)  # storable in a record

    partial = make_record("partial", acc_ref, {"shift-a": 0.5}, kind="reproduced")
    attach_effective_robustness(partial, base)
    assert set(partial.effective_robustness["per_shift"]) == {"shift-a"}
    assert partial.effective_robustness[SHIFT_AVG] is None
    assert partial.effective_robustness["missing"] == [SHIFT_AVG]

    with pytest.raises(ValueError, match="suite"):
        attach_effective_robustness(make_record("x", 0.5, above, suite="other"), base)


def test_json_round_trip(tmp_path, baseline_records):
    base = Baseline.from_records(baseline_records, "toy-baseline", "probit", source="unit test")
    path = base.save(tmp_path / "baselines" / "toy.json")
    loaded = Baseline.load(path)
    assert loaded == base
    assert loaded.fits["shift-a"] == base.fits["shift-a"]
    assert Baseline.from_json(base.to_json()).to_json() == base.to_json()
    with pytest.raises(ValueError, match="not a baseline file"):
        Baseline.from_json(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="not valid JSON"):
        Baseline.from_json("{", source="broken.json")


def test_load_baseline_by_path(tmp_path, baseline_records):
    zoo = tmp_path / "zoo"
    for r in baseline_records:  # stored accuracies are whole numbers of samples (records are checked on load)
        r.metrics = {d: {**m, "top1": round(m["top1"] * m["n"]) / m["n"]} for d, m in r.metrics.items()}
        write_record(r, zoo / f"{r.record_id}.json")
    fitted = load_baseline(zoo)
    assert fitted.name == "zoo" and fitted.fits["shift-a"].n == 12
    assert len(baseline_records_of(zoo)) == 12
    saved = fitted.save(tmp_path / "zoo.json")
    assert load_baseline(saved) == fitted and baseline_records_of(saved) == []
    with pytest.raises(FileNotFoundError, match="no baseline 'nope'"):
        load_baseline("nope")


@pytest.mark.parametrize("x, y, match", [
    ([0.5, 0.6], [0.4, 0.5], "at least 3 distinct"),
    ([0.5, 0.5, 0.5, 0.6], [0.4, 0.4, 0.4, 0.5], "at least 3 distinct"),
    ([0.5, 0.5, 0.5], [0.4, 0.5, 0.6], "same x accuracy"),
    ([0.5, 0.6, 0.7], [0.4, 0.5], "differ in length"),
    ([50.0, 60.0, 70.0], [40.0, 50.0, 60.0], "percentages"),
    ([0.5, 0.6, -0.1], [0.4, 0.5, 0.6], r"fractions in \[0, 1\]"),
    ([0.5, 0.6, float("nan")], [0.4, 0.5, 0.6], "NaN"),
])
def test_bad_input_gives_clear_errors(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_linear(x, y)


def test_unknown_transform():
    with pytest.raises(ValueError, match="unknown axis transform 'log'"):
        transform(0.5, "log")
    with pytest.raises(ValueError, match="unknown axis transform"):
        LinearFit.from_dict({"slope": 1, "intercept": 0, "r": 1, "n": 3, "transform": "loggit"})
    with pytest.raises(ValueError, match="no records with kind"):
        Baseline.from_records([make_record("r", 0.5, {"shift-a": 0.4}, kind="reproduced")], "b")


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["fits"]["shift-a"].update(slope=float("nan")), "fit 'shift-a': fit field 'slope' must be a finite"),
    (lambda d: d["fits"]["shift-a"].update(slope="1.2"), "fit field 'slope' must be a finite number"),
    (lambda d: d["fits"]["shift-a"].update(n=1.5), "fit field 'n' must be a whole number"),
    (lambda d: d["fits"]["shift-a"].update(r=3.0), "must be a correlation in"),
    (lambda d: d["fits"]["shift-a"].pop("intercept"), r"missing \['intercept'\]"),
    (lambda d: d["points"]["shift-a"].update(x=[0.5, "x"]), "points 'shift-a': fit points 'x' must be a list of finite"),
    (lambda d: d["points"]["shift-a"].update(y=[1.5] * len(d["points"]["shift-a"]["x"])), "accuracies in"),
    (lambda d: d.update(fits=[]), "'fits' and 'points' must be objects"),
    (lambda d: d.update(name=3), "field 'name' must be a string"),
])
def test_a_baseline_file_is_validated_when_loaded(tmp_path, baseline_records, edit, match):
    """A NaN or mistyped coefficient used to load and then give +nan effective robustness or a traceback."""
    import json as json_mod

    data = json_mod.loads(Baseline.from_records(baseline_records, "toy").to_json())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json_mod.dumps(data))
    with pytest.raises(ValueError, match=match):
        Baseline.load(path)


def test_piecewise_baselines_predict_band_and_draw_by_piece(baseline_records):
    from robustbench_ft.report.figures import scatter_figure
    from robustbench_ft.robustness.baseline import FitPoints
    from robustbench_ft.robustness.fits import fit_piecewise

    base = Baseline.from_records(baseline_records, "toy")
    pts = base.points["shift-a"]
    base.fits["shift-a"] = fit_piecewise(pts.x, pts.y, "logit", (0.6,), x_dataset="ref", y_dataset="shift-a")
    lo, hi = base.band("shift-a", np.array([0.35, 0.55, 0.65, 0.85]), n_boot=50)
    assert np.all(np.isfinite(lo)) and np.all(lo <= hi)
    again = Baseline.from_json(base.to_json())
    assert again.fits["shift-a"] == base.fits["shift-a"] and isinstance(again.points["shift-a"], FitPoints)
    fig = scatter_figure([make_record("c", 0.7, {s: 0.5 for s in SHIFTS}, kind="reproduced")], "shift-a",
                         avg_shifts=SHIFTS, baseline=base, kind="logit", n_boot=20)
    line = next(l for l in fig.axes[0].lines if "piecewise" in l.get_label())
    assert np.isnan(line.get_ydata()).sum() == 1  # broken once, at the pivot
