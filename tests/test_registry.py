"""Method registry: the decorator, entry-point plugins, and the README's example method."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from robustbench_ft import RunConfig, run
from robustbench_ft.methods import registry
from robustbench_ft.methods.registry import get_method, list_methods, register_method


def test_builtin_methods_are_listed_with_options():
    names = {m.name: m for m in list_methods()}
    assert {"zeroshot", "finetune", "wise-ft"} <= set(names)
    assert names["wise-ft"].paper.startswith("Wortsman")


def test_options_must_be_a_dataclass():
    with pytest.raises(TypeError, match="options` must be a dataclass"):
        @register_method("broken")
        class Broken:
            options = dict


def test_unknown_option_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"has no option\(s\) \['epoch'\]; its options: \[.*'epochs'"):
        get_method("finetune").make_options({"epoch": 3})


def test_entry_point_package_adds_a_method(tmp_path, monkeypatch, run_dirs):
    """A separately installed package (simulated: a dist-info on sys.path) registers a method."""
    pkg = tmp_path / "site" / "rbft_plugin_demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    # the plugin is the README's "Adding a method" example, so the README cannot drift from what works
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    example = readme.split("## Adding a method", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    (pkg / "halfway.py").write_text(example)
    dist = tmp_path / "site" / "rbft_plugin_demo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rbft-plugin-demo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[robustbench_ft.methods]\nhalfway = rbft_plugin_demo.halfway\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    try:
        spec = get_method("halfway")
        assert spec.summary.startswith("WiSE-FT at a fixed α") and spec.paper == "Me et al. 2026"
        out = run(RunConfig(model="rbft-tiny-vit", pretrained="random", suite="synthetic", method="halfway",
                            method_options={"alpha": 0.25}, report=False, **run_dirs),
                  progress=False, log=lambda m: None)
        assert [r.candidate for r in out.records] == ["halfway α=0.25"]
    finally:
        registry._METHODS.pop("halfway", None)
        sys.modules.pop("rbft_plugin_demo.halfway", None)
        sys.modules.pop("rbft_plugin_demo", None)


def test_registering_a_name_twice_is_refused():
    @dataclass(frozen=True)
    class NoOptions:
        pass

    with pytest.raises(ValueError, match="already registered"):
        @register_method("wise-ft")
        class Impostor:
            options = NoOptions
