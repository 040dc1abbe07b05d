"""Model grids like CLIP_benchmark's (one command, every model x pretrained pair) and the flat CSV export."""
from __future__ import annotations

import io

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from robustbench_ft.board.export import records_to_table
from robustbench_ft.cli import main
from robustbench_ft.grid import parse_pairs
from robustbench_ft.models.clip import create_architecture
from robustbench_ft.report.figures import scatter_figure
from robustbench_ft.results import ResultRecord, load_records


def test_pairs_are_the_product_of_lists_or_the_lines_of_a_file(tmp_path):
    assert parse_pairs("a,b", "x,y") == [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]
    assert parse_pairs("a", "x") == [("a", "x")]
    listing = tmp_path / "models.txt"
    listing.write_text("# model,pretrained\nViT-B-32,openai\n\nViT-B-32,laion2b_s34b_b79k  # a comment\n")
    assert parse_pairs("", "", listing) == [("ViT-B-32", "openai"), ("ViT-B-32", "laion2b_s34b_b79k")]
    listing.write_text("ViT-B-32 openai\n")
    with pytest.raises(ValueError, match="line 1: expected 'model,pretrained'"):
        parse_pairs("", "", listing)


def _args(run_dirs, *extra) -> list[str]:
    return ["run", "--method", "zeroshot", "--suite", "synthetic", "--data-root", run_dirs["data_root"],
            "--cache-dir", run_dirs["cache_dir"], "--results-dir", run_dirs["results_dir"], "--reports-dir",
            run_dirs["reports_dir"], "--workers", "0", *extra]


def test_one_command_runs_a_grid_resumes_it_and_reports_every_model(run_dirs, tmp_path, capsys):
    torch.manual_seed(3)
    other = tmp_path / "other-vit.safetensors"
    save_file({k: v.contiguous() for k, v in create_architecture("rbft-tiny-vit")[0].state_dict().items()}, other)
    listing = tmp_path / "models.txt"
    listing.write_text(f"rbft-tiny-vit,random\nrbft-tiny-rn,random\nrbft-tiny-vit,{other}\n")
    assert main(_args(run_dirs, "--models-file", str(listing), "--run-name", "g")) == 0
    out = capsys.readouterr().out
    assert "report:" in out and out.count("zeroshot") == 3
    records = load_records([run_dirs["results_dir"]])
    assert sorted((r.model, r.pretrained) for r in records) == sorted(
        [("rbft-tiny-vit", "random"), ("rbft-tiny-rn", "random"), ("rbft-tiny-vit", str(other))])
    page = (tmp_path / "reports" / "g" / "index.html").read_text()
    assert "rbft-tiny-rn (random)" in page and "3 models" in page
    assert main(_args(run_dirs, "--models-file", str(listing), "--run-name", "g")) == 0
    assert capsys.readouterr().out.count("reusing 1 finished record(s)") == 3  # a rerun resumes: nothing recomputed
    assert main(_args(run_dirs, "--model", "rbft-tiny-vit,no-such-model", "--pretrained", "random")) == 2
    assert "1 of the grid's 2 pairs cannot run: no-such-model,random: unknown model" in capsys.readouterr().err
    assert main(_args(run_dirs, "--models-file", str(listing), "--model", "rbft-tiny-vit")) == 2
    assert "drop --model and --pretrained" in capsys.readouterr().err

    assert main(["export", run_dirs["results_dir"]]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table.columns) == ["model", "pretrained", "method", "candidate", "dataset", "metric", "value",
                                   "suite", "seed", "record_id", "kind"]
    top1 = table[(table.metric == "top1") & (table.dataset == "synth")]
    assert len(top1) == 3 and set(top1.seed) == {0}
    by_id = {r.record_id: r for r in records}
    assert all(by_id[row.record_id].metrics["synth"]["top1"] == row.value for row in top1.itertuples())
    assert main(["export", run_dirs["results_dir"], "--out", str(tmp_path / "all.csv")]) == 0
    assert pd.read_csv(tmp_path / "all.csv").equals(table)


def _zs(model: str, ref: float, shift: float) -> ResultRecord:
    return ResultRecord(record_id=f"id-{model}", suite="toy", model=model, pretrained="p", method="zeroshot",
                        candidate="zeroshot", reference="clean", shifts=["sketch"],
                        metrics={"clean": {"top1": ref, "n": 1000}, "sketch": {"top1": shift, "n": 1000}},
                        tags={"endpoint": "zeroshot", "alpha": 0.0}, effective_robustness={
                            "per_shift": {"sketch": 0.05}, "shift-avg": 0.05})


def test_the_zero_shot_models_get_their_own_trend_and_export_keeps_every_number():
    records = [_zs("m1", 0.6, 0.4), _zs("m2", 0.7, 0.5), _zs("m3", 0.8, 0.62)]
    fig = scatter_figure(records, "sketch", avg_shifts=["sketch"], baseline=None)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(label.startswith("zero-shot trend (3 models") for label in labels)
    assert not any("trend" in t.get_text() for t in scatter_figure(records[:2], "sketch", avg_shifts=["sketch"],
                                                                     baseline=None).axes[0].get_legend().get_texts())
    table = records_to_table(records)
    er = table[table.metric == "effective_robustness"]
    assert len(er) == 6 and set(er.dataset) == {"sketch", "shift-avg"} and table.seed.isna().all()
