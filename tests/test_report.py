"""HTML report: self-contained page, one figure per shift and the average, escaping, figure files."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image
from scipy import special

from robustbench_ft.report import render_report
from robustbench_ft.report.figures import percent_ticks
from robustbench_ft.results import ResultRecord
from robustbench_ft.robustness.axes import transform
from robustbench_ft.robustness.baseline import Baseline

SHIFTS = ("sketch", "rotated", "noisy")
HOSTILE = "<script>alert(1)</script>"


def _record(name: str, ref: float, shift_accs: dict[str, float], *, kind: str = "reproduced",
            method: str = "erm", tags: dict | None = None) -> ResultRecord:
    metrics = {"clean": {"top1": ref, "n": 2000}, **{s: {"top1": a, "n": 2000} for s, a in shift_accs.items()}}
    return ResultRecord(
        record_id=f"id-{name}", suite="toy", model="tiny-vit", pretrained="demo", method=method, candidate=name,
        reference="clean", shifts=list(shift_accs), metrics=metrics, tags=tags or {}, kind=kind,
        config={"model": "tiny-vit", "method": method, "optim": {"lr": 1e-5, "epochs": 2}, "note": HOSTILE},
        config_hash="abc123", versions={"python": "3.x", "torch": "2.x"})


def synthetic_records(n_baseline: int = 15, alphas=(0.2, 0.4, 0.5, 0.6, 0.8), shifts=SHIFTS,
                      seed: int = 0) -> list[ResultRecord]:
    """Baseline models on a logit-linear trend per shift; a zero-shot model well above it, a
    fine-tuned one near it, and WiSE-FT mixtures in between bulging above both."""
    rng = np.random.default_rng(seed)
    slopes = {s: t for s, t in {"sketch": (0.9, -1.2), "rotated": (1.0, -0.6), "noisy": (0.7, -0.2)}.items()
              if s in shifts}

    def on_trend(ref: float, lift: float) -> dict[str, float]:
        return {s: float(special.expit(a * special.logit(ref) + b + lift + rng.normal(0, 0.08)))
                for s, (a, b) in slopes.items()}

    records = [_record(f"baseline-{i}", float(x), on_trend(float(x), 0.0), kind="baseline", method="erm")
               for i, x in enumerate(np.linspace(0.55, 0.95, n_baseline))]
    curve = "wise-ft/finetune"
    zs_ref, ft_ref = 0.70, 0.93
    for alpha in (0.0, *alphas, 1.0):
        ref = zs_ref + (ft_ref - zs_ref) * (1 - (1 - alpha) ** 2)
        lift = 1.2 * (1 - alpha) + 0.8 * alpha * (1 - alpha)
        endpoint = {0.0: "zeroshot", 1.0: "finetuned"}.get(alpha)
        tags = {"alpha": alpha, "curve": curve, **({"endpoint": endpoint} if endpoint else {})}
        name = {0.0: "zero-shot", 1.0: "fine-tuned"}.get(alpha, f"wise-ft α={alpha:.2f}")
        records.append(_record(name, ref, on_trend(ref, lift), method="wise-ft", tags=tags))
    records.append(_record(HOSTILE, 0.8, on_trend(0.8, 0.3), method="$\\frac{x$"))  # $ would start mathtext
    return records


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    page = render_report(synthetic_records(), out, title=f"toy report {HOSTILE}", n_boot=200)
    return out, page, page.read_text(encoding="utf-8")


def test_page_written_and_self_contained(rendered):
    out, page, html = rendered
    assert page == out / "index.html" and page.is_file()
    assert 'src="http' not in html and "<link" not in html and "@import" not in html and "url(" not in html
    assert "<script" not in html.lower()
    imgs = re.findall(r'<img src="data:image/png;base64,', html)
    assert len(imgs) == len(SHIFTS) + 1  # one per shift plus the shift average
    assert not list(out.glob("**/*.tmp"))


def test_hostile_text_is_escaped(rendered):
    _, _, html = rendered
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_tables_present(rendered):
    _, _, html = rendered
    for table_id in ("accuracy-table", "er-table", "fit-table", "baseline-accuracy-table"):
        assert f'id="{table_id}"' in html
    assert "wise-ft α=0.50" in html and "zero-shot" in html
    assert "optim.lr" in html  # nested config flattened


def test_figure_files_and_pixels(rendered):
    out, _, _ = rendered
    pngs = sorted((out / "figures").glob("*.png"))
    svgs = sorted((out / "figures").glob("*.svg"))
    assert len(pngs) == len(svgs) == len(SHIFTS) + 1
    assert {p.stem for p in pngs} == {"scatter-sketch", "scatter-rotated", "scatter-noisy", "scatter-shift-avg"}
    for p in pngs:
        img = np.asarray(Image.open(io.BytesIO(p.read_bytes())).convert("L"), dtype=float)
        assert img.shape[0] > 300 and img.shape[1] > 300
        assert img.std() > 10  # not a blank canvas
    assert svgs[0].read_text(encoding="utf-8").lstrip().startswith("<?xml")


def test_explicit_baseline_and_rerender(tmp_path):
    records = synthetic_records(n_baseline=6, alphas=(0.5,), shifts=("sketch",))
    baseline = Baseline.from_records(records, "toy-trend", "probit")
    candidates = [r for r in records if r.kind != "baseline"]
    page = render_report(candidates, tmp_path, baseline=baseline, n_boot=50)
    first = page.read_text(encoding="utf-8")
    assert "toy-trend" in first and "probit" in first
    # the baseline's stored points stand in for absent baseline records: dots and band still drawn
    render_report(candidates, tmp_path, baseline=baseline, n_boot=50)  # overwrite in place
    assert len(list((tmp_path / "figures").glob("*.png"))) == 2  # the shift and the average
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_without_baseline_and_errors(tmp_path):
    records = [r for r in synthetic_records(shifts=("noisy",)) if r.kind != "baseline"]
    html = render_report(records, tmp_path).read_text(encoding="utf-8")
    assert 'id="er-table"' not in html  # no baseline, no stored ER: no table
    other = _record("other-suite", 0.5, {"noisy": 0.4})
    other.suite = "elsewhere"
    with pytest.raises(ValueError, match="one suite"):
        render_report(records + [other], tmp_path / "x")
    with pytest.raises(ValueError, match="no records"):
        render_report([], tmp_path / "y")


def test_linear_axes_and_extreme_accuracies(tmp_path):
    records = synthetic_records(n_baseline=5, alphas=(0.5,), shifts=("noisy",))
    records[0].metrics["clean"]["top1"] = 0.0  # a baseline model at exactly 0 % and one at 100 %
    records[4].metrics["noisy"]["top1"] = 1.0
    baseline = Baseline.from_records(records, "linear-trend", "linear")
    render_report(records, tmp_path, baseline=baseline, n_boot=50)
    img = np.asarray(Image.open(tmp_path / "figures" / "scatter-noisy.png").convert("L"), dtype=float)
    assert img.std() > 10


@pytest.mark.parametrize("lo, hi, expected_in", [(0.05, 0.99, [10, 50, 90]), (0.70, 0.76, None), (0.001, 0.9999, [50])])
def test_percent_ticks_span_the_data(lo, hi, expected_in):
    z_lo, z_hi = transform([lo, hi], "logit")
    ticks = percent_ticks(z_lo, z_hi, "logit")
    assert 3 <= len(ticks) <= 9
    assert all(100 * lo <= t <= 100 * hi for t in ticks)
    for t in expected_in or []:
        assert t in ticks
