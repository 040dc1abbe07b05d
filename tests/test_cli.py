"""The non-run subcommands: list, shard, verify, report."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from robustbench_ft.cli import main


@pytest.mark.parametrize("what,expected", [
    ("methods", "wise-ft"), ("suites", "demo: reference mnist"), ("datasets", "sklearn-digits"),
    ("models", "rbft-tiny-vit"),
])
def test_list(capsys, what, expected):
    assert main(["list", what]) == 0
    assert expected in capsys.readouterr().out


def _imagefolder(root, per_class=4):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_shard_then_verify(tmp_path, capsys):
    _imagefolder(tmp_path / "src")
    assert main(["shard", "imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), "--samples-per-shard", "3",
                 "--resize-shorter", "20", "--workers", "1"]) == 0
    assert "wrote 8 samples of 2 classes in 3 shard(s)" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "out")]) == 0
    assert "sha256 match" in capsys.readouterr().out
    shard = sorted((tmp_path / "out").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(tmp_path / "out")]) == 2
    assert shard.name in capsys.readouterr().err


def test_shard_wrong_layout_says_what_was_expected(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    assert main(["shard", "imagefolder", str(tmp_path / "flat"), str(tmp_path / "out")]) == 2
    assert "<class>" in capsys.readouterr().err


def test_report_from_records(tmp_path, run_dirs, capsys):
    from robustbench_ft import RunConfig, run

    out = run(RunConfig(model="rbft-tiny-vit", pretrained="random", suite="synthetic", method="zeroshot",
                        report=False, **run_dirs), progress=False, log=lambda m: None)
    assert main(["report", str(out.record_paths[0].parent), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "index.html").is_file()
    assert main(["report", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "rep2")]) == 2
    assert "no result record or directory" in capsys.readouterr().err
