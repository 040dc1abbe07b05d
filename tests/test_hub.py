"""`hf-hub:` checkpoints from a prepared local hub cache, offline: nothing here may reach the network."""
from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import huggingface_hub.constants
import open_clip
import pytest
import torch
from conftest import SYNTH_CLASSES, SYNTH_TEMPLATES
from safetensors.torch import load_file, save_file

from robustbench_ft import RunConfig, run
from robustbench_ft.board.submissions import make_bundle, read_bundle, validate_bundle
from robustbench_ft.cli import main
from robustbench_ft.methods.resolve import resolve
from robustbench_ft.models import hub
from robustbench_ft.models.classifier import Classifier
from robustbench_ft.models.clip import create_architecture, load_clip
from robustbench_ft.results import load_records

COMMIT = "a" * 40
REPO = "rbft/tiny-clip"
TINY = dict(model="rbft-tiny-vit", suite="synthetic", report=False)


def _no_network(monkeypatch) -> None:
    """Connections beyond the loopback interface fail the test (the hub cache must serve everything)."""
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("/"):
            raise AssertionError(f"the test tried to reach {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A hub cache laid out as huggingface_hub keeps one (models--ORG--REPO/refs/main, snapshots/<commit>/...)
    holding a tiny random open_clip model and a classifier fine-tuned from it; offline mode on."""
    cache = tmp_path / "hf-cache"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    torch.manual_seed(7)
    net = create_architecture("rbft-tiny-vit")[0]
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, snapshot / "open_clip_model.safetensors")
    config = {"model_cfg": open_clip.get_model_config("rbft-tiny-vit"),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"}}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    for key, value in {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _no_network(monkeypatch)
    hub._fetch.cache_clear()
    yield snapshot
    hub._fetch.cache_clear()


def test_pretrained_hf_hub_loads_the_repo_weights_and_preprocessing(hub_cache):
    clip = load_clip("rbft-tiny-vit", f"hf-hub:{REPO}")
    saved = load_file(hub_cache / "open_clip_model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in clip.model.state_dict().items())
    normalize = clip.preprocess_eval.transforms[-1]
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5) and tuple(normalize.std) == (0.25, 0.25, 0.25)
    digest = hashlib.sha256((hub_cache / "open_clip_model.safetensors").read_bytes()).hexdigest()
    pinned = resolve(RunConfig(**TINY, pretrained=f"hf-hub:{REPO}@{COMMIT}", method="zeroshot"))
    branch = resolve(RunConfig(**TINY, pretrained=f"hf-hub:{REPO}", method="zeroshot"))
    assert pinned.identity["pretrained"] == branch.identity["pretrained"] == f"sha256:{digest}"
    with pytest.raises(hub.HubError, match="is not a rbft-tiny-rn: its open_clip_config.json model_cfg differs"):
        load_clip("rbft-tiny-rn", f"hf-hub:{REPO}")
    with pytest.raises(hub.HubError, match="rbft/absent: cannot get .* HF_HUB_OFFLINE=1"):
        load_clip("rbft-tiny-vit", "hf-hub:rbft/absent")
    with pytest.raises(hub.HubError, match="not an hf-hub reference"):
        hub.HubRef.parse("hf-hub:no-slash")


def test_runs_take_hf_hub_for_pretrained_and_finetuned_and_submissions_record_it(hub_cache, run_dirs, tmp_path,
                                                                                  capsys):
    clip = load_clip("rbft-tiny-vit", f"hf-hub:{REPO}")
    classifier = Classifier.zeroshot(clip, SYNTH_CLASSES, SYNTH_TEMPLATES)
    with torch.no_grad():
        classifier.head.weight.mul_(2.0)  # "fine-tuned": any other weights
    (hub_cache / "ft").mkdir()
    classifier.save(hub_cache / "ft" / "classifier")
    config = RunConfig(**TINY, **run_dirs, pretrained=f"hf-hub:{REPO}", method="wise-ft",
                       method_options={"finetuned": f"hf-hub:{REPO}@{COMMIT}/ft/classifier.safetensors",
                                       "alpha": (0.5,)})
    outcome = run(config, progress=False, log=lambda m: None)
    by_name = {r.candidate: r for r in outcome.records}
    assert set(by_name) == {"zeroshot", "finetuned", "wise-ft α=0.50", "wise-ft α chosen on val"}
    assert by_name["finetuned"].tags["base"] == f"hf-hub:{REPO}@{COMMIT}/ft/classifier.safetensors"
    assert by_name["zeroshot"].pretrained == f"hf-hub:{REPO}"
    assert by_name["finetuned"].config["resolved"]["options"]["finetuned"].startswith("sha256:")

    weights = hub_cache / "ft" / "classifier.safetensors"
    bundle = make_bundle(load_records([outcome.records_dir]), name="Hub Method", paper="https://a.b/p",
                         code="https://a.b/c", checkpoint=f"hf-hub:{REPO}/ft/classifier.safetensors")
    assert bundle["method"]["checkpoint"] == {"hf_hub": REPO, "revision": COMMIT, "file": "ft/classifier.safetensors",
                                              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    assert read_bundle(path).method.checkpoint["hf_hub"] == REPO
    assert main(["leaderboard", "--add", str(path), "--results-dir", str(tmp_path / "board")]) == 0
    stored = load_records([tmp_path / "board" / "submissions"])
    assert stored[0].tags["submission"]["checkpoint_hf_hub"] == f"hf-hub:{REPO}@{COMMIT}/ft/classifier.safetensors"
    bad = json.loads(json.dumps(bundle))
    bad["method"]["checkpoint"]["revision"] = "main"
    bad["method"]["checkpoint"]["file"] = "../x.pt"
    with pytest.raises(ValueError, match=r"(?s)revision: must be the 40-hex commit.*checkpoint.file: must be a file name"):
        validate_bundle(bad, source="bad")
