"""The benchmark protocol (issue 13): α chosen on held-out ID data only, oracle rows unranked, seeds as an
axis (mean ± std), and the analyses of the WiSE-FT paper checked against direct numpy computations."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from robustbench_ft import RunConfig, run
from robustbench_ft.board.leaderboard import build_leaderboard
from robustbench_ft.board.render import to_csv, to_markdown
from robustbench_ft.loading import shard_dataset, training_batches
from robustbench_ft.results import load_records

TINY = dict(model="rbft-tiny-vit", pretrained="random", suite="synthetic", report=False)
QUICK = {"base_options": {"max_steps": 3, "batch_size": 8, "warmup_steps": 1, "lr": 1e-3}}


def _wise(run_dirs, **options):
    return RunConfig(method="wise-ft", method_options={**QUICK, **options}, **TINY, **run_dirs)


def test_alpha_is_chosen_on_the_val_split_and_nothing_else_is_read(run_dirs, monkeypatch):
    opened: list[Path] = []
    for module, cls in ((shard_dataset, "ShardDataset"), (training_batches, "ShardSamples")):
        real = getattr(module, cls).__init__

        def spy(self, directory, *args, _real=real, **kwargs):
            opened.append(Path(directory))
            _real(self, directory, *args, **kwargs)

        monkeypatch.setattr(getattr(module, cls), "__init__", spy)
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):  # the method (training, choosing α) is done; the test evaluation would start here
        raise Stop

    monkeypatch.setattr("robustbench_ft.runner.score_suite", stop)
    with pytest.raises(Stop):
        run(_wise(run_dirs, alpha="0:1:0.5"), progress=False, log=lambda m: None)
    root = Path(run_dirs["data_root"])
    assert {p.relative_to(root).as_posix() for p in opened} == {"synth/train", "synth/val"}  # never test/shift


def test_the_selected_alpha_is_the_best_on_val_and_recorded_with_its_grid(run_dirs):
    out = run(_wise(run_dirs, alpha="0:1:0.25"), progress=False, log=lambda m: None)
    (chosen,) = [r for r in out.records if r.placement.choice == "val"]
    selection = chosen.tags["selection"]
    assert selection["split"] == "synth/val" and selection["metric"] == "top1" and len(selection["grid"]) == 11
    best = max(selection["scores"])
    assert selection["alpha"] == min(a for a, s in zip(selection["grid"], selection["scores"]) if s == best)
    assert chosen.placement.alpha == selection["alpha"]
    choices = {r.candidate: r.placement.choice for r in out.records}
    assert choices == {"zeroshot": None, "finetune": None, "wise-ft α=0.25": "oracle", "wise-ft α=0.50": "fixed",
                       "wise-ft α=0.75": "oracle", "wise-ft α chosen on val": "val"}


def test_ties_and_a_flat_curve_choose_the_smaller_alpha(run_dirs):
    """A fine-tuned endpoint equal to the zero-shot model makes every α the same classifier: α = 0 wins."""
    from robustbench_ft.methods.alpha_curve import select_alpha
    from robustbench_ft.methods.context import MethodContext
    from robustbench_ft.methods.resolve import resolve
    from robustbench_ft.models import load_clip

    ctx = MethodContext(resolve(_wise(run_dirs)), load_clip("rbft-tiny-vit", "random"), progress=False,
                        log=lambda m: None)
    flat = {a: ctx.zeroshot for a in (0.3, 0.1, 0.2)}
    selection = select_alpha(ctx, flat)
    assert selection.alpha == 0.1 and len(set(selection.scores)) == 1 and selection.grid == (0.1, 0.2, 0.3)


def test_oracle_rows_are_unranked_unless_asked_for(run_dirs):
    out = run(_wise(run_dirs, alpha="0:1:0.25"), progress=False, log=lambda m: None)
    (board,) = build_leaderboard(out.records)
    ranks = {e.record.candidate: e.rank for e in board.entries}
    assert ranks["wise-ft α=0.25"] is None and ranks["wise-ft α=0.75"] is None
    assert all(ranks[c] is not None for c in ("zeroshot", "finetune", "wise-ft α=0.50", "wise-ft α chosen on val"))
    markdown = to_markdown([board])
    assert "| oracle | wise-ft α=0.25" in markdown and "choice made on test data" in markdown
    (everything,) = build_leaderboard(out.records, include_oracle=True)
    assert all(e.rank is not None for e in everything.entries)


def test_a_lone_alpha_is_fixed_and_published_optimal_alpha_rows_are_oracles():
    records = load_records([Path(__file__).parents[1] / "results" / "published"])
    optimal = [r for r in records if "optimal" in r.candidate]
    assert optimal and all(r.placement.choice == "oracle" for r in optimal)
    boards = {b.suite: b for b in build_leaderboard(records)}
    assert all(e.rank is None for e in boards["imagenet"].entries if "optimal" in e.record.candidate)
    from robustbench_ft.methods.registry import get_method

    assert get_method("wise-ft").make_options({"alpha": 0.3}).choice_of(0.3) == "fixed"
    assert get_method("wise-ft").make_options({"alpha": "0.3,0.4"}).choice_of(0.3) == "oracle"


def test_seeds_change_training_and_nothing_else(run_dirs, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from robustbench_ft.models import load_clip

    torch.manual_seed(0)  # fixed pretrained weights: "random" would draw them from the run's seed
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in load_clip("rbft-tiny-vit", "random").model.state_dict().items()},
              str(weights))
    config = RunConfig(method="wise-ft", method_options={**QUICK, "select": False}, seeds=(0, 1),
                       **{**TINY, "pretrained": str(weights)}, **run_dirs)
    out = run(config, progress=False, log=lambda m: None)
    by_seed = {s: {r.candidate: r for r in out.records if r.seed == s} for s in (0, 1)}
    assert set(by_seed[0]) == set(by_seed[1]) == {"zeroshot", "finetune", "wise-ft α=0.50"}
    assert by_seed[0]["zeroshot"].metrics == by_seed[1]["zeroshot"].metrics  # no training: seed-independent
    assert by_seed[0]["finetune"].config_hash != by_seed[1]["finetune"].config_hash
    config_0, config_1 = (by_seed[s]["finetune"].config["resolved"] for s in (0, 1))
    assert {k for k in config_0 if config_0[k] != config_1[k]} == {"seed"}
    assert sorted(p.parent.name for p in out.record_paths) == ["seed-0"] * 3 + ["seed-1"] * 3
    (board,) = build_leaderboard(out.records)
    rows = {e.record.candidate: e for e in board.entries}
    assert len(board.entries) == 3 and rows["finetune"].seeds == [0, 1]
    ft = [by_seed[s]["finetune"].reference_score for s in (0, 1)]
    assert rows["finetune"].reference == pytest.approx(np.mean(ft))
    if ft[0] != ft[1]:
        assert rows["finetune"].spread["reference"] == pytest.approx(np.std(ft, ddof=1))
    assert "(2 seeds)" in to_markdown([board]) and "reference_std" in to_csv([board])
    from robustbench_ft.report import render_report

    page = render_report(out.records, tmp_path / "report", n_boot=5).read_text()
    assert "Over seeds" in page and "0,1" in page
    from robustbench_ft.cli.run import print_summary

    print_summary(out.records)  # the console summary of a seeds run: one row per candidate, mean ± std
    text = capsys.readouterr().out
    lines = {line.split("  ")[0]: line for line in text.splitlines() if "  " in line}
    assert "ER avg (pp)" in lines["candidate"] and "mean ± sample std over the seeds" in text
    ft_ref = f"{100 * np.mean(ft):.1f} ± {100 * np.std(ft, ddof=1):.1f}"
    assert lines["finetune"].split()[1:3] == ["0,1", ft_ref.split()[0]] and ft_ref in lines["finetune"]
    again = run(config, progress=False, log=lambda m: None)  # finished: every record reused
    assert [r.to_dict() for r in again.records] == [r.to_dict() for r in out.records]


def _curve_record(alpha: float, ref: float, shift: float, choice: str | None = None):
    from robustbench_ft.results import ResultRecord

    tags = {"alpha": alpha, "curve": "wise-ft/finetune", **({"choice": choice} if choice else {})}
    return ResultRecord(f"r{alpha}", "synthetic", "m", "p", "wise-ft", f"wise-ft α={alpha}", "synth",
                        ["synth-inverted"], {"synth": {"top1": ref}, "synth-inverted": {"top1": shift}}, tags=tags)


def test_report_shows_the_best_alpha_per_column_and_its_gain_over_one_half(tmp_path):
    from robustbench_ft.report.tables import alpha_gain_table

    records = [_curve_record(0.0, 0.60, 0.50), _curve_record(0.3, 0.70, 0.58), _curve_record(0.5, 0.75, 0.55),
               _curve_record(0.8, 0.80, 0.52), _curve_record(1.0, 0.82, 0.45)]
    table = alpha_gain_table(records, "synth", ["synth-inverted"], ["synth-inverted"])
    (row,) = table.rows
    assert [c.text for c in row] == ["wise-ft/finetune", "α=1: +7.0", "α=0.3: +3.0", "α=0.3: +3.0"]
    from robustbench_ft.report import render_report

    page = render_report(records, tmp_path / "report", n_boot=5).read_text()
    assert "the best α per column" in page and "α=0.3: +3.0" in page


def test_report_of_an_imagenet_run_lists_both_pieces_of_the_imagenet_a_trend():
    from robustbench_ft.report.tables import fit_table
    from robustbench_ft.robustness.baseline import load_baseline

    rows = [[c.text for c in row] for row in fit_table(load_baseline("imagenet-testbed")).rows]
    pieces = [r for r in rows if r[0].startswith("imagenet-a")]
    assert [r[0] for r in pieces] == ["imagenet-a (x < 91.86 %)", "imagenet-a (x ≥ 91.86 %)"]
    assert [r[5] for r in pieces] == ["33", "51"]


# --------------------------------------------------------------------------------------------
# The WiSE-FT paper's analyses: each against a direct computation on a hand-made example
# --------------------------------------------------------------------------------------------

def test_prediction_diversity_counts_disagreements_where_exactly_one_is_right():
    from robustbench_ft.board.analyses import prediction_diversity

    labels = np.array([0, 1, 2, 0])
    a = np.eye(3)[[0, 1, 0, 1]]   # right, right, wrong, wrong
    b = np.eye(3)[[0, 2, 2, 2]]   # right, wrong, right, wrong (both wrong on the last, differently)
    assert prediction_diversity(a, b, labels) == 0.5  # samples 1 and 2


def test_cka_complement_is_one_minus_linear_cka_of_centred_features():
    from robustbench_ft.board.analyses import cka_complement

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    assert cka_complement(x, 3.0 * x + 7.0) == pytest.approx(0.0, abs=1e-12)  # invariant to scale and shift
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    assert cka_complement(x, x @ q) == pytest.approx(0.0, abs=1e-12)  # and to rotations
    y = rng.normal(size=(50, 3))
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct = 1 - np.sum((yc.T @ xc) ** 2) / (np.sqrt(np.sum((xc.T @ xc) ** 2)) * np.sqrt(np.sum((yc.T @ yc) ** 2)))
    assert cka_complement(x, y) == pytest.approx(direct, rel=1e-12)


def test_overrides_and_margins_on_a_hand_made_example():
    from robustbench_ft.board.analyses import overrides

    zs = np.array([[3.0, 1.0], [0.0, 2.0], [5.0, 4.5], [1.0, 0.0]])
    ft = np.array([[0.0, 4.0], [1.0, 0.0], [0.0, 6.0], [2.0, 1.0]])
    ens = 0.5 * (zs + ft)          # predictions: 1, 1, 1, 0 — zs: 0, 1, 0, 0; ft: 1, 0, 1, 0
    out = overrides(zs, ft, ens)   # they disagree on 0, 1, 2; the ensemble sides with zs on 1, with ft on 0 and 2
    assert out["disagree"] == 0.75 and out["zeroshot_overrides"] == 0.25 and out["zeroshot_overridden"] == 0.5
    assert out["margin_zeroshot"] == pytest.approx((2 + 2 + 0.5 + 1) / 4)
    assert out["margin_finetuned"] == pytest.approx((4 + 1 + 6 + 1) / 4)
    zs2 = np.array([[5.0, 0.0], [0.0, 2.0]])
    ft2 = np.array([[0.0, 1.0], [0.0, 1.0]])
    out2 = overrides(zs2, ft2, 0.5 * (zs2 + ft2))  # sample 0: zs is sure and wins
    assert out2["zeroshot_overrides"] == 0.5 and out2["margin_zeroshot_where_it_overrides"] == 5.0


def test_curve_against_chord_on_a_hand_made_curve():
    from robustbench_ft.board.analyses import curve_against_chord

    out = curve_against_chord({0.0: 0.5, 0.5: 0.8, 1.0: 0.7})
    assert out["above_chord"] == {"0.5": pytest.approx(0.8 - 0.6)} and out["all_above_chord"]
    assert out["best_alpha"] == 0.5 and out["beats_both_endpoints"]
    assert out["best_gain_over_endpoints"] == pytest.approx(0.1)
    below = curve_against_chord({0.0: 0.5, 0.5: 0.55, 1.0: 0.7})
    assert not below["all_above_chord"] and not below["beats_both_endpoints"] and below["best_alpha"] == 1.0


def test_analyze_a_finished_run_from_its_caches(run_dirs, capsys, monkeypatch):
    from robustbench_ft.cli import main
    from robustbench_ft.methods import finetune as finetune_module

    out = run(_wise(run_dirs, alpha="0:1:0.5", select=False), progress=False, log=lambda m: None)
    trained = []
    monkeypatch.setattr(finetune_module, "train", lambda *a, **k: trained.append(1))
    run_dir = out.records_dir
    assert main(["analyze", str(run_dir)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "wise-ft/finetune: zero-shot vs fine-tuned" in printed and not trained  # nothing trained again
    import json

    analysis = json.loads((Path(run_dirs["reports_dir"]) / run_dir.name / "analysis.json").read_text())
    synth = analysis["curves"]["wise-ft/finetune"]["datasets"]["synth"]
    assert 0.0 <= synth["prediction_diversity"] <= 1.0 and "cka_complement_features" in synth
    page = (Path(run_dirs["reports_dir"]) / run_dir.name / "index.html").read_text()
    assert "what the ensemble combines" in page
    import shutil

    shutil.rmtree(Path(run_dirs["cache_dir"]) / "checkpoints")
    assert main(["analyze", str(run_dir)]) == 2
    assert "rerun `robustbench-ft run` with the same settings first" in capsys.readouterr().err
