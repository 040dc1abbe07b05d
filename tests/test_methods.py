"""The fine-tuning methods: each checked against what its paper defines, on tiny random models and the
synthetic suite (and on a few images of the demo suite)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from robustbench_ft import RunConfig
from robustbench_ft.cli import main
from robustbench_ft.datasets.registry import get_suite, register_suite
from robustbench_ft.datasets.spec import Suite
from robustbench_ft.evaluation.dataset_pass import evaluate
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.loading.training_batches import sample_seed
from robustbench_ft.methods.context import MethodContext
from robustbench_ft.methods.ensemble import Ensemble
from robustbench_ft.methods.finetune import Finetune
from robustbench_ft.methods.flyp import CaptionedContrastiveLoss, Flyp, clip_loss
from robustbench_ft.methods.l2_sp import L2SP, l2_sp_penalty
from robustbench_ft.methods.linear_probe import LinearProbe
from robustbench_ft.methods.registry import get_method
from robustbench_ft.methods.resolve import resolve
from robustbench_ft.methods.soup import Soup, greedy_soup
from robustbench_ft.methods.wise_ft import WiseFT, WiseFTOptions
from robustbench_ft.models import load_clip
from robustbench_ft.models.classifier import average, state_hash
from robustbench_ft.results import load_records

TINY = dict(model="rbft-tiny-vit", pretrained="random", suite="synthetic", report=False)
TRAIN = {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "lr": 1e-3, "max_steps": 3}
PROBE = {"c_min": 0.01, "c_max": 100.0, "c_steps": 3, "max_iter": 30}

try:
    get_suite("synthetic-noval")
except KeyError:  # a suite like the synthetic one, without a val split
    register_suite(Suite("synthetic-noval", reference="synth", shifts=("synth-inverted",), train=("synth", "train"),
                         val=None))


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("rbft-tiny-vit", "random")


def context(run_dirs: dict, clip, method: str, options: dict, suite: str = "synthetic", seed: int = 0):
    config = RunConfig(method=method, method_options=options, seed=seed, **{**TINY, "suite": suite}, **run_dirs)
    return MethodContext(resolve(config), clip, progress=False, log=lambda m: None)


def logits(model, images):
    with torch.no_grad():
        return model(images)


# --- WiSE-FT over a linear probe = output-space ensemble -------------------------------------

def test_wise_ft_over_linear_probe_equals_output_space_ensemble(run_dirs, clip):
    options = {"alpha": "0:1:0.25", "base": "lp", "base_options": PROBE}
    wise = WiseFT().run(context(run_dirs, clip, "wise-ft", options))
    ens = Ensemble().run(context(run_dirs, clip, "ensemble", options))
    by_alpha = [{c.tags["alpha"]: c.classifier for c in cands} for cands in (wise, ens)]
    assert sorted(by_alpha[0]) == sorted(by_alpha[1]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    images = torch.randn(6, 3, 32, 32)
    for alpha, model in by_alpha[0].items():
        torch.testing.assert_close(logits(model, images), logits(by_alpha[1][alpha], images), rtol=1e-5, atol=1e-5)
    # The probe and every α keep the zero-shot encoder module: one encoder pass per image for the whole curve.
    assert len({id(c.classifier.visual) for c in wise}) == 1
    calls = []
    wise[0].classifier.visual.register_forward_hook(lambda *a: calls.append(1))
    ctx = context(run_dirs, clip, "wise-ft", options)
    evaluate({c.name: c.classifier for c in wise}, ctx.split_dir("val"), clip.preprocess_eval, EvalOptions(batch_size=64, progress=False))
    assert len(calls) == 1


def test_base_aliases():
    assert WiseFTOptions(base="ft").base == "finetune" and WiseFTOptions(base="lp").base == "linear-probe"
    assert get_method("lp").name == "linear-probe"
    for base in ("lp-ft", "flyp", "l2-sp"):
        assert WiseFTOptions(base=base).base == get_method(base).name == base


# --- Linear probe: C chosen on held-out training data -----------------------------------------


def test_linear_probe_chooses_c_on_the_val_split_only(run_dirs, clip, shard_reads):
    (cand,) = LinearProbe().run(context(run_dirs, clip, "linear-probe", PROBE))
    assert sorted(set(shard_reads)) == ["synth/train", "synth/val"]  # never synth/test, never a shift
    info = cand.classifier.info.provenance["linear_probe"]
    assert info["selection"] == "val split synth/val"
    assert [s["c"] for s in info["sweep"]] == pytest.approx([0.01, 1.0, 100.0])
    assert info["val_top1"] == max(s["val_top1"] for s in info["sweep"]) and info["c"] in [0.01, 1.0, 100.0]
    # Features are cached: another C grid reads no shard at all.
    shard_reads.clear()
    LinearProbe().run(context(run_dirs, clip, "linear-probe", {**PROBE, "c_steps": 2}))
    assert shard_reads == []


def test_linear_probe_without_val_split_holds_out_training_data(run_dirs, clip, shard_reads):
    (cand,) = LinearProbe().run(context(run_dirs, clip, "linear-probe", {**PROBE, "holdout_fraction": 0.25},
                                        suite="synthetic-noval"))
    assert set(shard_reads) == {"synth/train"}
    assert cand.classifier.info.provenance["linear_probe"]["selection"].startswith("0.25 of the training split")


def test_logistic_regression_matches_scikit_learn():
    """C means what it means in scikit-learn (and in the CLIP paper's sweep): same optimum."""
    from sklearn.linear_model import LogisticRegression

    from robustbench_ft.methods.linear_probe import fit_logistic_regression

    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 3
    x = torch.nn.functional.normalize(torch.randn(120, 8, generator=g), dim=-1) + 0.3 * torch.eye(8)[y]
    W, b = fit_logistic_regression(x, y, 10.0, torch.zeros(3, 8), torch.zeros(3))
    ref = LogisticRegression(C=10.0, max_iter=10_000, tol=1e-10).fit(x.numpy(), y.numpy())
    torch.testing.assert_close(W, torch.from_numpy(ref.coef_).float(), atol=2e-3, rtol=0)
    # The unpenalised bias is defined up to a constant shift across classes in the softmax.
    torch.testing.assert_close(b - b.mean(), torch.from_numpy(ref.intercept_ - ref.intercept_.mean()).float(),
                               atol=2e-3, rtol=0)


def test_linear_probe_learns_the_training_task(run_dirs, clip):
    """Colour squares on a random encoder: the probe must beat the random zero-shot head on held-out data."""
    ctx = context(run_dirs, clip, "linear-probe", {"c_min": 1.0, "c_max": 1e4, "c_steps": 3})
    (cand,) = LinearProbe().run(ctx)
    preds = evaluate({"lp": cand.classifier, "zs": ctx.zeroshot}, ctx.split_dir("val"), clip.preprocess_eval, EvalOptions(progress=False))
    assert preds.top1("lp") >= 0.75 and preds.top1("lp") > preds.top1("zs")


# --- FLYP -----------------------------------------------------------------------------------

def test_clip_loss_is_the_symmetric_infonce_on_a_hand_checked_batch():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = 2·image·textᵀ = [[2, 1.2], [0, 1.6]]; rows: image→text, columns: text→image; targets: diagonal.
    image_to_text = [math.log(math.exp(2) + math.exp(1.2)) - 2, math.log(math.exp(0) + math.exp(1.6)) - 1.6]
    text_to_image = [math.log(math.exp(2) + math.exp(0)) - 2, math.log(math.exp(1.2) + math.exp(1.6)) - 1.6]
    expected = (sum(image_to_text) / 2 + sum(text_to_image) / 2) / 2
    loss = clip_loss(image, text, torch.tensor(2.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6) and expected == pytest.approx(0.298736, abs=1e-6)
    from open_clip.loss import ClipLoss

    assert loss.item() == pytest.approx(ClipLoss()(image, text, torch.tensor(2.0)).item(), rel=1e-6)


def test_flyp_captions_are_random_templates_of_the_image_class():
    classes, templates = ["red", "green", "blue"], ["a {}.", "the {} one.", "{}!"]
    texts = [t.format(c) for t in templates for c in classes]
    loss = CaptionedContrastiveLoss(lambda batch: torch.tensor([[texts.index(s)] for s in batch]), classes,
                                    templates)
    labels = torch.tensor([0, 1, 2, 2, 1, 0] * 5)
    seeds = torch.tensor([sample_seed(0, 0, i) for i in range(len(labels))])
    captions = [texts[i] for i in loss.captions(labels, seeds)[:, 0].tolist()]
    assert all(classes[y] in text for y, text in zip(labels.tolist(), captions))
    assert len({text for text in captions if "blue" in text}) > 1  # several templates drawn
    assert torch.equal(loss.captions(labels, seeds), loss.captions(labels, seeds))  # the sample seed decides


def test_flyp_finetunes_a_copy_and_rebuilds_the_head_from_its_text_tower(run_dirs, clip):
    before = state_hash(clip.model)
    ctx = context(run_dirs, clip, "flyp", TRAIN)
    (cand,) = Flyp().run(ctx)
    assert state_hash(clip.model) == before  # ctx.clip untouched
    flyp = cand.classifier
    assert not torch.equal(flyp.head.weight, ctx.zeroshot.head.weight)
    scale = flyp.info.provenance["logit_scale"]  # head rows: fine-tuned logit_scale × unit text embeddings
    torch.testing.assert_close(flyp.head.weight.norm(dim=1), torch.full((3,), scale), rtol=1e-5, atol=1e-5)
    assert flyp.info.provenance["training"]["steps"] == 3


# --- L2-SP ------------------------------------------------------------------------------------

def test_l2_sp_penalty_is_zero_at_init_and_ignores_the_head(clip):
    from robustbench_ft.models import Classifier

    zs = Classifier.zeroshot(clip, ["a", "b"], ["{}"])
    penalty = l2_sp_penalty(zs, alpha=0.1)
    model = copy.deepcopy(zs)
    assert penalty(model).item() == 0.0
    with torch.no_grad():
        model.head.weight.add_(1.0)
        assert penalty(model).item() == 0.0
        first = next(model.visual.parameters())
        first.add_(0.5)
    assert penalty(model).item() == pytest.approx(0.5 * 0.1 * 0.25 * first.numel(), rel=1e-5)


def test_l2_sp_with_zero_coefficient_is_plain_finetuning(run_dirs, clip):
    (ft,) = Finetune().run(context(run_dirs, clip, "finetune", TRAIN))
    # with the same (decoupled) weight decay: L2-SP's own default is 0, since Ω replaces it
    assert get_method("l2-sp").make_options({}).weight_decay == 0.0
    (l2,) = L2SP().run(context(run_dirs, clip, "l2-sp", {**TRAIN, "sp_alpha": 0.0, "weight_decay": 0.1}))
    ft_state, l2_state = ft.classifier.state_dict(), l2.classifier.state_dict()
    assert all(torch.equal(ft_state[k], l2_state[k]) for k in ft_state)
    (pulled,) = L2SP().run(context(run_dirs, clip, "l2-sp", {**TRAIN, "sp_alpha": 100.0}))

    def distance(model):
        zero = context(run_dirs, clip, "finetune", TRAIN).zeroshot.visual.state_dict()
        return sum((v - zero[k]).pow(2).sum() for k, v in model.visual.state_dict().items())

    assert distance(pulled.classifier) < distance(ft.classifier)


def test_l2_sp_head_penalty_pulls_the_head_towards_the_zero_shot_head(run_dirs, clip):
    zs_head = context(run_dirs, clip, "l2-sp", TRAIN).zeroshot.head.weight.detach()
    (free,) = L2SP().run(context(run_dirs, clip, "l2-sp", TRAIN))
    (held,) = L2SP().run(context(run_dirs, clip, "l2-sp", {**TRAIN, "head_penalty": 100.0}))
    moved = [(m.classifier.head.weight.detach() - zs_head).norm() for m in (free, held)]
    assert moved[1] < moved[0]


# --- Soups ------------------------------------------------------------------------------------

def test_uniform_soup_of_identical_checkpoints_is_that_checkpoint(run_dirs, clip):
    (ft,) = Finetune().run(context(run_dirs, clip, "finetune", TRAIN))
    clones = [copy.deepcopy(ft.classifier) for _ in range(3)]
    soup = average(clones, [1 / 3] * 3)
    for key, value in ft.classifier.state_dict().items():
        torch.testing.assert_close(soup.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    # The same through the method: three runs with one seed are three copies of one checkpoint.
    (cand,) = Soup().run(context(run_dirs, clip, "soup", {"kind": "uniform", "ingredient_seeds": (0, 0, 0), "base": "ft",
                                                          "base_options": TRAIN}))
    images = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(logits(cand.classifier, images), logits(ft.classifier, images), rtol=1e-5, atol=1e-5)


def test_soup_ingredients_differ_by_seed_and_grid(run_dirs, clip):
    ctx = context(run_dirs, clip, "soup", {"kind": "greedy", "ingredient_seeds": (0, 1), "lrs": (1e-3, 1e-4),
                                           "base_options": TRAIN, "evaluate_ingredients": True})
    cands = Soup().run(ctx)
    soup, ingredients = cands[0], cands[1:]
    assert [c.name for c in ingredients] == ["ingredient seed=0 lr=0.001", "ingredient seed=0 lr=0.0001",
                                             "ingredient seed=1 lr=0.001", "ingredient seed=1 lr=0.0001"]
    hashes = {c.classifier.content_hash() for c in ingredients}
    assert len(hashes) == 4
    info = soup.classifier.info.provenance["soup"]
    assert soup.tags["ingredients"] == len(info["chosen"]) >= 1 and len(info["val_top1"]) == 4
    assert info["soup_val_top1"] >= max(info["val_top1"])  # greedy never ends below its best ingredient


def test_greedy_soup_adds_an_ingredient_only_if_held_out_accuracy_strictly_improves(clip):
    """model-soups' main.py adds an ingredient only on `>`; a tie leaves it out (issue 13)."""
    from robustbench_ft.models import Classifier

    base = Classifier.zeroshot(clip, ["a", "b"], ["{}"])
    models = []
    for i in range(4):
        m = copy.deepcopy(base)
        with torch.no_grad():
            m.head.bias.fill_(float(i))
        models.append(m)
    trials = iter([0.90, 0.70, 0.95])  # soups {1,3}: a tie, left out; {1,2}: worse, left out; {1,0}: better, kept
    soup, chosen, score = greedy_soup(models, lambda m: next(trials), [0.5, 0.9, 0.6, 0.8])
    assert chosen == [1, 0] and score == 0.95
    torch.testing.assert_close(soup.head.bias, torch.full((2,), (1 + 0) / 2))


def test_greedy_soup_needs_a_val_split(run_dirs, clip):
    with pytest.raises(ValueError, match="declares no val split; use --kind uniform"):
        Soup().run(context(run_dirs, clip, "soup", {"kind": "greedy", "base_options": TRAIN}, suite="synthetic-noval"))


# --- Every method from the command line --------------------------------------------------------

TRAIN_FLAGS = ["--epochs", "1", "--batch-size", "8", "--warmup-steps", "1", "--lr", "1e-3", "--max-steps", "2"]
PROBE_FLAGS = ["--c-min", "0.1", "--c-max", "10", "--c-steps", "2", "--max-iter", "20"]


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    """One set of directories for all CLI runs: shards are built once and endpoints are reused."""
    root = tmp_path_factory.mktemp("cli-methods")
    return dict(data_root=str(root / "data"), cache_dir=str(root / "cache"), results_dir=str(root / "results"),
                reports_dir=str(root / "reports"), workers=0, eval_batch_size=64)


CLI_CASES = {
    "linear-probe": (["--method", "linear-probe", *PROBE_FLAGS], ["linear-probe"]),
    "lp-ft": (["--method", "lp-ft", *PROBE_FLAGS, *TRAIN_FLAGS], ["lp-ft"]),
    "flyp": (["--method", "flyp", *TRAIN_FLAGS], ["flyp"]),
    "l2-sp": (["--method", "l2-sp", "--sp-alpha", "0.5", *TRAIN_FLAGS], ["l2-sp"]),
    "ensemble-ft": (["--method", "ensemble", "--alpha", "0.5", "--base", "ft", *TRAIN_FLAGS],
                    ["zeroshot", "finetune", "ensemble α=0.50", "ensemble α chosen on val"]),
    "wise-ft-lp": (["--method", "wise-ft", "--alpha", "0.5", "--base", "lp", *PROBE_FLAGS],
                   ["zeroshot", "linear-probe", "wise-ft α=0.50", "wise-ft α chosen on val"]),
    "wise-ft-lp-ft": (["--method", "wise-ft", "--alpha", "0.5", "--base", "lp-ft", *PROBE_FLAGS, *TRAIN_FLAGS],
                      ["zeroshot", "lp-ft", "wise-ft α=0.50", "wise-ft α chosen on val"]),
    "wise-ft-flyp": (["--method", "wise-ft", "--alpha", "0.5", "--base", "flyp", *TRAIN_FLAGS],
                     ["zeroshot", "flyp", "wise-ft α=0.50", "wise-ft α chosen on val"]),
    "wise-ft-l2-sp": (["--method", "wise-ft", "--alpha", "0.5", "--base", "l2-sp", *TRAIN_FLAGS],
                      ["zeroshot", "l2-sp", "wise-ft α=0.50", "wise-ft α chosen on val"]),
    "soup-uniform": (["--method", "soup", "--kind", "uniform", "--ingredient-seeds", "0,1", *TRAIN_FLAGS], ["uniform soup"]),
    "soup-greedy": (["--method", "soup", "--kind", "greedy", "--ingredient-seeds", "0,1", *TRAIN_FLAGS], ["greedy soup"]),
    "flyp-ablations": (["--method", "flyp", "--loss", "ce", "--no-train-text", "--prompts", "fixed",
                        *TRAIN_FLAGS], ["flyp"]),
    "vrf": (["--method", "vrf", "--base", "ft", "--k", "1", *TRAIN_FLAGS], ["zeroshot", "finetune", "vrf"]),
    "m2-mix": (["--method", "m2-mix", "--mmix", "0.05", *TRAIN_FLAGS], ["m2-mix"]),
    "carot": (["--method", "carot", "--ema-every", "1", *TRAIN_FLAGS], ["carot"]),
    "fsr": (["--method", "fsr", *TRAIN_FLAGS], ["fsr"]),
    "model-stock": (["--method", "model-stock", "--ingredient-seeds", "0,1", *TRAIN_FLAGS], ["model-stock"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_every_method_runs_from_the_cli(shared_dirs, capsys, case):
    args, candidates = CLI_CASES[case]
    argv = ["run", "--model", "rbft-tiny-vit", "--pretrained", "random", "--suite", "synthetic", "--no-report",
            "--run-name", case, *args]
    for key, value in shared_dirs.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main(argv) == 0, capsys.readouterr().err
    records = [json.loads(p.read_text()) for p in (Path(shared_dirs["results_dir"]) / case).glob("*.json")]
    assert sorted(r["candidate"] for r in records) == sorted(candidates)
    for record in records:
        assert set(record["metrics"]) == {"synth", "synth-inverted"} and record["metrics"]["synth"]["n"] == 24


# --- The demo suite ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """The demo suite's datasets built with their real builders, limited to a few images each."""
    from robustbench_ft.datasets.registry import get_dataset

    root = tmp_path_factory.mktemp("small-demo") / "data"
    suite = get_suite("demo")
    splits = [suite.train, suite.val, *((name, "test") for name in suite.eval_datasets)]
    for name, split in splits:
        spec = get_dataset(name)
        spec.builders[split](spec.path(root, split), limit=40 if split == "train" else 20)
    return root


@pytest.mark.parametrize("case", ["linear-probe", "lp-ft", "flyp", "l2-sp", "ensemble-ft", "wise-ft-lp-ft",
                                  "wise-ft-flyp", "soup-greedy"])
def test_every_method_runs_from_the_cli_on_the_demo_suite(small_demo, tmp_path, capsys, case):
    """The real demo datasets (a few images each) and the demo architecture, randomly initialised."""
    args, candidates = CLI_CASES[case]
    argv = ["run", "--model", "rbft-demo-vit", "--pretrained", "random", "--suite", "demo", "--no-report",
            "--run-name", case, "--data-root", str(small_demo), "--cache-dir", str(tmp_path / "cache"),
            "--results-dir", str(tmp_path / "results"), "--workers", "0", "--eval-batch-size", "64", *args]
    assert main(argv) == 0, capsys.readouterr().err
    records = load_records([tmp_path / "results" / case])
    assert sorted(r.candidate for r in records) == sorted(candidates)
    assert all(set(r.metrics) == set(get_suite("demo").eval_datasets) for r in records)
    assert all(r.effective_robustness for r in records)  # measured against the demo baseline zoo


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    config = RunConfig.from_toml(path)
    options = get_method(config.method).make_options(config.method_options)
    base = getattr(options, "base", None)
    if base is not None:  # the nested base options are checked against the base method too
        get_method(base).make_options(options.base_options)


def test_finetune_after_wise_ft_on_the_demo_suite_trains_nothing(small_demo, tmp_path, capsys, monkeypatch):
    """One resolved run: WiSE-FT's fine-tuned endpoint and `run --method finetune` with the same effective
    options (the demo suite's defaults plus the same flags) are one checkpoint, trained once."""
    from robustbench_ft.methods import finetune as finetune_module

    steps = []
    real_train = finetune_module.train
    monkeypatch.setattr(finetune_module, "train", lambda *a, **k: steps.append(1) or real_train(*a, **k))
    common = ["--model", "rbft-demo-vit", "--pretrained", "random", "--suite", "demo", "--no-report",
              "--data-root", str(small_demo), "--cache-dir", str(tmp_path / "cache"), "--results-dir",
              str(tmp_path / "results"), "--workers", "0", "--eval-batch-size", "64", *TRAIN_FLAGS]
    assert main(["run", "--method", "wise-ft", *common]) == 0
    assert steps == [1]
    assert main(["run", "--method", "finetune", *common]) == 0, capsys.readouterr().err
    assert steps == [1] and "using cached finetune checkpoint" in capsys.readouterr().out


def test_a_suite_default_is_part_of_the_key_of_what_it_reaches():
    demo = get_suite("demo")
    changed = register_suite(Suite("demo-other-lr", reference=demo.reference, shifts=demo.shifts, train=demo.train,
                                   val=demo.val, baseline=demo.baseline,
                                   method_defaults={**demo.method_defaults,
                                                    "finetune": {**demo.method_defaults["finetune"], "lr": 2e-4}}))
    try:
        base, other = (resolve(RunConfig(method="wise-ft", suite=s)) for s in ("demo", changed.name))
        assert base.options.base_options == {} and base.identity["options"]["base_options"]["lr"] == 1e-4
        assert other.identity["options"]["base_options"]["lr"] == 2e-4
        sub, top = base.sub_run("finetune", {}), resolve(RunConfig(method="finetune", suite="demo"))
        assert sub.hash == top.hash  # the endpoint of wise-ft is the run of finetune
        assert resolve(RunConfig(method="finetune", suite=changed.name)).hash != top.hash
    finally:
        from robustbench_ft.datasets import registry

        registry._SUITES.pop(changed.name)
