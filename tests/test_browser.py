"""A real browser opens a rendered report and the leaderboard from disk (headless Chromium).

Checks what only a browser can: the inlined figures decode and paint (compared, pixel for pixel,
with the same page whose figures are replaced by white images of the same size, so the figure
region is exactly where the two screenshots differ), and hostile text in a method name stays text:
no script runs (the title is unchanged after load) and no element is made from it.

Chromium comes from Debian's package (``apt-get install chromium``; ``.ci/run`` installs it). Without
it these tests are skipped, saying so.
"""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import synthetic_records

from robustbench_ft.board.leaderboard import build_leaderboard
from robustbench_ft.board.render import write_leaderboard
from robustbench_ft.report import render_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed "
                                "(Debian: apt-get install chromium; .ci/run installs it)")

HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"
WIDTH, HEIGHT = 1280, 2000


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on a local file, with no network features and a fresh profile."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           f"--window-size={WIDTH},{HEIGHT}", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=True)


def screenshot(page: Path, tmp: Path, name: str) -> np.ndarray:
    png = tmp / f"{name}.png"
    chromium(page, tmp / f"profile-{name}", f"--screenshot={png}")
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)


def dump_dom(page: Path, tmp: Path) -> str:
    return chromium(page, tmp / "profile-dom", "--dump-dom").stdout


def blank_figures(html: str) -> str:
    """The page with every inlined figure replaced by a white PNG of the same size (same layout)."""
    def white(match: re.Match) -> str:
        size = Image.open(io.BytesIO(base64.b64decode(match.group(1)))).size
        buf = io.BytesIO()
        Image.new("RGB", size, "white").save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return re.sub(r"data:image/png;base64,([A-Za-z0-9+/=]+)", white, html)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    records = synthetic_records(n_baseline=10, alphas=(0.5,))
    hostile = next(r for r in records if r.kind == "reproduced" and not r.tags)
    hostile.method = HOSTILE
    out = tmp_path_factory.mktemp("browser-report")
    page = render_report(records, out, title="browser check", n_boot=50)
    return page, records


def test_report_figures_paint_and_are_not_blank(report, tmp_path):
    page, _ = report
    control = page.parent / "blank.html"
    control.write_text(blank_figures(page.read_text(encoding="utf-8")), encoding="utf-8")
    real, blank = screenshot(page, tmp_path, "real"), screenshot(control, tmp_path, "blank")
    assert real.shape == blank.shape == (HEIGHT, WIDTH, 3)

    differs = np.abs(real - blank).sum(axis=2) > 30
    rows, cols = np.nonzero(differs)
    assert rows.size > 0, "the figures painted nothing: the page looks the same with white images"
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    assert bottom - top > 600 and right - left > 900  # a grid of figures, two per row, at least two rows
    region = real[top:bottom + 1, left:right + 1]
    assert (blank[top:bottom + 1, left:right + 1] >= 250).all(axis=2).mean() > 0.97  # the control is white there
    non_white = (region < 235).any(axis=2).mean()
    coloured = (region.max(axis=2) - region.min(axis=2) > 80).mean()  # curves, markers: not text or grey axes
    assert 0.03 < non_white < 0.6, f"figure region is {non_white:.1%} non-white"
    assert region.std() > 20 and coloured > 0.001, f"figure region has too little colour ({coloured:.2%})"


def test_hostile_method_name_is_text_in_the_report(report, tmp_path):
    page, _ = report
    dom = dump_dom(page, tmp_path)
    assert "<title>browser check</title>" in dom and "pwned" not in dom.split("</title>")[0]
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in dom
    assert '<img src="x"' not in dom and "<img src=x" not in dom


def test_leaderboard_opens_and_keeps_hostile_text_inert(report, tmp_path):
    _, records = report
    page = write_leaderboard(build_leaderboard(records, baselines={"toy": None}), tmp_path / "board.html", "html",
                             title="board check")
    shot = screenshot(page, tmp_path, "board")
    body = shot[: HEIGHT // 2]
    assert (body < 200).any(axis=2).mean() > 0.01  # text and table rendered
    dom = dump_dom(page, tmp_path)
    assert "<title>board check</title>" in dom and "pwned" not in dom.split("</title>")[0]
    assert dom.count("<tr>") == len([r for r in records if r.kind != "baseline"]) + 1
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom and '<img src="x"' not in dom
