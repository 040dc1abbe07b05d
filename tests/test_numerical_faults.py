"""Numerical faults (issue 8, item 5): NaN/Inf in a checkpoint is refused naming the tensor; a loss that
goes non-finite stops training naming the step and the tensor it shows in; accuracies of exactly 0 or
100 % (and baselines whose x values coincide) never put NaN into a fit, an effective robustness, a
record or a figure."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from robustbench_ft import RunConfig, run
from robustbench_ft.cli import main
from robustbench_ft.models import CheckpointError, Classifier, load_clip
from robustbench_ft.results import ResultRecord, write_record
from robustbench_ft.robustness.baseline import SHIFT_AVG, Baseline
from robustbench_ft.robustness.effective import attach_effective_robustness
from robustbench_ft.robustness.fits import bootstrap_band, fit_linear

TINY = dict(model="rbft-tiny-vit", pretrained="random", suite="synthetic", report=False)


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone().contiguous() for k, v in load_clip("rbft-tiny-vit", "random").model.state_dict().items()}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pretrained_checkpoint_is_refused_naming_the_tensor(tmp_path, bad):
    state = _tiny_state()
    state["visual.transformer.resblocks.0.attn.in_proj_weight"].view(-1)[3] = bad
    path = tmp_path / "diverged.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"'visual\.transformer\.resblocks\.0\.attn\.in_proj_weight' holds NaN"):
        load_clip("rbft-tiny-vit", str(path))


def test_non_finite_checkpoint_stops_the_cli_before_any_work(run_dirs, tmp_path, capsys):
    state = _tiny_state()
    state["logit_scale"].fill_(float("nan"))
    state["text_projection"].fill_(float("inf"))
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    args = ["run", "--model", "rbft-tiny-vit", "--pretrained", str(path), "--suite", "synthetic", "--no-report"]
    for key in ("data_root", "cache_dir", "results_dir", "reports_dir"):
        args += [f"--{key.replace('_', '-')}", run_dirs[key]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds NaN or infinite values (and 1 more tensor(s))" in err
    assert not list(Path(run_dirs["results_dir"]).rglob("*.json"))


def test_non_finite_finetuned_classifier_is_refused(tmp_path):
    clip = load_clip("rbft-tiny-vit", "random")
    clf = Classifier.zeroshot(clip, ["a", "b"], ["{}"])
    with torch.no_grad():
        clf.head.weight[1, 2] = float("nan")
    path = clf.save(tmp_path / "clf")
    with pytest.raises(CheckpointError, match="'head.weight' holds NaN"):
        Classifier.load(path)


def test_loss_blowing_up_names_the_step_and_a_tensor(run_dirs):
    config = RunConfig(method="finetune", method_options={"lr": 1e30, "max_steps": 6, "warmup_steps": 0,
                                                          "grad_clip": 0.0}, **TINY, **run_dirs)
    with pytest.raises(FloatingPointError, match=r"loss became (nan|inf|-inf) at step \d+ \(epoch \d+\); "
                                                 r"(parameter|the gradient of) '[\w.]+' holds NaN/Inf"):
        run(config, progress=False, log=lambda m: None)
    assert not list(Path(run_dirs["cache_dir"]).rglob("*.safetensors"))  # no diverged checkpoint is cached


def test_non_finite_data_stops_training_at_step_zero_naming_a_gradient(run_dirs, monkeypatch):
    """NaN pixels (a broken transform, say): the loss of the very first step is NaN."""
    from robustbench_ft.models.classifier import Classifier as Clf

    forward = Clf.forward
    monkeypatch.setattr(Clf, "forward", lambda self, images: forward(self, images * float("nan")))
    with pytest.raises(FloatingPointError, match=r"at step 0 \(epoch 0\); the gradient of '[\w.]+' holds NaN"):
        run(RunConfig(method="finetune", method_options={"max_steps": 2}, **TINY, **run_dirs), progress=False,
            log=lambda m: None)


# --------------------------------------------------------------------------------------------
# Accuracies of 0 and 100 %
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["logit", "probit", "linear"])
def test_fit_through_zero_and_one_accuracies_is_finite(kind):
    x = [0.0, 0.3, 0.7, 1.0]
    y = [0.0, 0.1, 0.5, 1.0]
    fit = fit_linear(x, y, kind, x_n=[100] * 4, y_n=[100] * 4)
    assert np.isfinite([fit.slope, fit.intercept, fit.r]).all() and fit.slope > 0
    predicted = fit.predict(np.array([0.0, 1.0]), n=100)
    assert np.isfinite(predicted).all() and ((predicted >= 0) & (predicted <= 1)).all()
    lo, hi = bootstrap_band(x, y, kind, np.array([0.0, 0.5, 1.0]), n_boot=50, x_n=[100] * 4, y_n=[100] * 4)
    assert np.isfinite(lo).all() and np.isfinite(hi).all() and (lo <= hi).all()


def test_all_equal_y_gives_a_flat_line_not_nan():
    fit = fit_linear([0.2, 0.5, 0.9], [1.0, 1.0, 1.0])
    assert fit.slope == 0.0 and fit.r == 0.0 and np.isfinite(fit.intercept)


@pytest.mark.parametrize("x", [[0.7, 0.7, 0.7], [1.0, 1.0, 1.0], [0.99995, 0.99999, 1.0], [0.0, 1e-6, 2e-5]])
def test_coinciding_x_values_are_a_clear_error_not_a_nan_slope(x):
    """[0.99995, 0.99999, 1.0] are distinct accuracies, but all clip to 1 - 1e-4 on the logit axis:
    before the check they gave slope NaN, and a NaN effective robustness then failed the record write."""
    with pytest.raises(ValueError, match="same x accuracy|coincide once 0 and 1 are clipped"):
        fit_linear(x, [0.1, 0.2, 0.3])


def _record(name: str, ref: float, shift: float, kind: str = "baseline") -> ResultRecord:
    return ResultRecord(record_id=name, suite="toy", model="m", pretrained="p", method="x", candidate=name,
                        reference="clean", shifts=["s1"], kind=kind,
                        metrics={"clean": {"top1": ref, "n": 50}, "s1": {"top1": shift, "n": 50}})


def test_baseline_and_effective_robustness_at_zero_and_one(tmp_path):
    zoo = [_record(f"b{i}", ref, shift) for i, (ref, shift) in
           enumerate([(0.0, 0.0), (0.4, 0.2), (0.8, 0.5), (1.0, 1.0), (1.0, 0.9)])]
    baseline = Baseline.from_records(zoo, "zoo")
    for cand in (_record("perfect", 1.0, 1.0, "reproduced"), _record("hopeless", 0.0, 0.0, "reproduced"),
                 _record("mixed", 1.0, 0.0, "reproduced")):
        attach_effective_robustness(cand, baseline)
        er = cand.effective_robustness
        assert np.isfinite([er[SHIFT_AVG], *er["per_shift"].values()]).all()
        write_record(cand, tmp_path / f"{cand.candidate}.json")  # allow_nan=False: would fail on NaN
        json.loads((tmp_path / f"{cand.candidate}.json").read_text())
    from robustbench_ft.report import render_report

    page = render_report(zoo + [_record("perfect", 1.0, 1.0, "reproduced")], tmp_path / "report", n_boot=50)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page.read_text())  # figures inlined
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
