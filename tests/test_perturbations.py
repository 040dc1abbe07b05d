"""Perturbation shifts: AutoAttack (pyautoattack) and the corruption portfolio, on tiny models and the synthetic suite."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from robustbench_ft import RunConfig
from robustbench_ft.perturbations.attack import PixelSpaceModel, attack_plan, autoattack, perturbation_norms
from robustbench_ft.perturbations.corruptions import PORTFOLIO, corrupt_portfolio, portfolio_assignment
from robustbench_ft.perturbations.evaluate import attack_subset, split_normalize
from robustbench_ft.perturbations.spec import parse_perturbation
from robustbench_ft.runner import run
from robustbench_ft.typed import ConfigError

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


class Linear(torch.nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class IgnoresInput(torch.nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), -1) + 0.0 * x.flatten(1)[:, :1]


def batch(model: PixelSpaceModel, n: int = 12, wrong: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch in [0, 1] whose labels are the model's clean predictions except for ``wrong`` of them."""
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:wrong] = (y[:wrong] + 1) % 10
    return x, y


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_names_parse_and_bad_ones_are_refused():
    assert parse_perturbation("linf-4/255").eps == pytest.approx(4 / 255)
    assert (parse_perturbation("l2-2.0").norm, parse_perturbation("l1-75").eps) == ("L2", 75.0)
    assert parse_perturbation("corruptions-s3").severity == 3
    for bad in ("linf-4", "l3-1", "corruptions-s6", "linf-0"):
        with pytest.raises(ConfigError):
            parse_perturbation(bad)
    with pytest.raises(ConfigError, match="more than once"):
        RunConfig(perturbations=("l2-2.0", "l2-2.0"))


@pytest.mark.parametrize("norm,eps", [("Linf", 16 / 255), ("L2", 1.0), ("L1", 8.0)])
def test_autoattack_stays_in_the_ball_and_never_raises_accuracy(norm, eps):
    torch.manual_seed(0)
    model = PixelSpaceModel(Linear(), MEAN, STD)
    x, y = batch(model)
    x_adv = autoattack(model, x, y, norm, eps, seed=0, num_classes=10, batch_size=16)
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1  # pixel space, before normalisation
    assert float(perturbation_norms(x_adv, x, norm).max()) <= eps * (1 + 1e-4) + 1e-6
    assert accuracy(model, x_adv, y) <= accuracy(model, x, y)
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)  # a linear model at this budget is broken somewhere


def test_a_model_that_ignores_its_input_keeps_its_clean_accuracy():
    torch.manual_seed(0)
    model = PixelSpaceModel(IgnoresInput(), MEAN, STD)
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([int(model.model.bias.argmax()), 0, 1, 2])
    x_adv = autoattack(model, x, y, "Linf", 4 / 255, seed=0, num_classes=10, batch_size=16)
    assert accuracy(model, x_adv, y) == accuracy(model, x, y)


def test_seeded_attacks_repeat_exactly_and_leave_the_global_rng_alone():
    torch.manual_seed(0)
    model = PixelSpaceModel(Linear(), MEAN, STD)
    x, y = batch(model)
    state = torch.random.get_rng_state()
    first = autoattack(model, x, y, "L2", 1.0, seed=7, num_classes=10, batch_size=16)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, autoattack(model, x, y, "L2", 1.0, seed=7, num_classes=10, batch_size=16))
    assert all(p.requires_grad for p in model.parameters()) and model.training  # restored after the attack


def test_few_classes_cap_the_target_classes():
    assert attack_plan("Linf", 10) == {"attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "target_classes": 9}
    assert attack_plan("L1", 10)["target_classes"] == 5
    assert attack_plan("Linf", 3) == {"attacks": ["apgd-ce", "fab-t", "square"], "target_classes": 2}


def test_corruption_portfolio_blocks_and_per_sample_seeds():
    assert portfolio_assignment(22) == [c for c in PORTFOLIO for _ in range(2)]
    assert portfolio_assignment(5) == list(PORTFOLIO[:5])
    pixels = np.random.default_rng(0).integers(0, 256, size=(11, 3, 32, 32)).astype(np.float32) / 255
    out = corrupt_portfolio(pixels, np.arange(11), 3, seed=0)
    assert out.shape == pixels.shape and out.min() >= 0 and out.max() <= 1
    assert np.array_equal(out, corrupt_portfolio(pixels, np.arange(11), 3, seed=0))
    # a sample's noise depends on its own index, not on which other samples are in the batch
    assert np.array_equal(out[:1], corrupt_portfolio(pixels[:1], np.arange(1), 3, seed=0))
    assert not np.array_equal(out[:1], corrupt_portfolio(pixels[:1], np.array([5]), 3, seed=0))
    with pytest.raises(ValueError, match="at least 32x32"):
        corrupt_portfolio(pixels[:, :, :28, :28], np.arange(11), 3, seed=0)


def test_subset_is_seeded_and_the_transform_is_split_before_normalize(clip_tiny):
    assert np.array_equal(attack_subset(100, 10, 0), attack_subset(100, 10, 0))
    assert not np.array_equal(attack_subset(100, 10, 0), attack_subset(100, 10, 1))
    assert np.array_equal(attack_subset(5, None, 0), np.arange(5))
    pixels, mean, std = split_normalize(clip_tiny.preprocess_eval)
    assert len(mean) == len(std) == 3 and "Normalize" not in repr(pixels)


@pytest.fixture(scope="module")
def clip_tiny():
    from robustbench_ft.models import load_clip

    torch.manual_seed(0)
    return load_clip("rbft-tiny-vit", "random")


def test_run_records_robust_accuracy_and_repeats(run_dirs):
    config = RunConfig(model="rbft-tiny-vit", pretrained="random", suite="synthetic", method="zeroshot",
                       perturbations=("linf-64/255", "corruptions-s3"), attack_samples=6, **run_dirs)
    outcome = run(config, progress=False, log=lambda m: None)
    first = outcome.records[0]
    assert "Robust accuracy under perturbations" in outcome.report.read_text(encoding="utf-8")
    entry = first.perturbations["linf-64/255"]
    assert entry["n"] == 6 and entry["population"] == 24 and entry["package"] == "pyautoattack"
    assert entry["top1"] <= entry["clean_top1"] and entry["norm"] == "Linf" and entry["subset_seed"] == 0
    assert first.perturbations["corruptions-s3"]["severity"] == 3
    assert "linf-64/255" not in first.metrics and not first.effective_robustness.get("per_shift", {}).get("linf-64/255")
    again = run(RunConfig(**{**config.to_dict(), "results_dir": run_dirs["results_dir"] + "2", "report": False}),
                progress=False,
                log=lambda m: None).records[0]
    assert again.perturbations == first.perturbations


def test_boards_show_robust_accuracy_columns_in_the_papers_order():
    from pathlib import Path

    from robustbench_ft.board.leaderboard import build_leaderboard
    from robustbench_ft.board.render import to_csv, to_markdown
    from robustbench_ft.results import load_records

    published = Path(__file__).parents[1] / "results" / "published"
    records = [r for r in load_records([published]) if r.suite == "transfer-uc-merced"]
    (board,) = build_leaderboard(records)
    assert board.perturbations == ["linf-4/255", "l2-2.0", "l1-75", "corruptions-s3"] and len(board.entries) == 12
    assert "| linf-4/255 (robust) | l2-2.0 (robust) |" in to_markdown([board])
    header, *rows = to_csv([board]).splitlines()
    assert header.endswith("robust@linf-4/255,robust@l2-2.0,robust@l1-75,robust@corruptions-s3") and len(rows) == 12
