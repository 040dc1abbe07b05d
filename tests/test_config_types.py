"""Every config source (TOML, Python, command line) is held to the declared field types (issue 19, item 1).

A TOML value never reaches a field of another type: ``trust_pickle = "false"`` used to be a truthy
string that unpickled a checkpoint in full (code execution from a config file).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pickle
import types
import typing
from pathlib import Path

import pytest
from fuzzing import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robustbench_ft.cli import main, run_config_from_argv
from robustbench_ft.config import RunConfig
from robustbench_ft.methods.registry import get_method, list_methods
from robustbench_ft.typed import ConfigError, field_hints


class _Exploit:
    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _toml_value(value) -> str:
    """A TOML literal for the values the fuzzer draws (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def _toml(top: dict, method: dict | None) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    if method is not None:
        lines += ["[method]"] + [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in method.items()]
    return "\n".join(lines) + "\n"


def conforms(value, hint) -> bool:
    """Whether ``value`` has the type ``hint`` declares (written apart from robustbench_ft.typed, on purpose)."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if hint is typing.Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int
    if hint is float:
        return type(value) is float and math.isfinite(value)
    if hint is str:
        return type(value) is str
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        return type(value) is tuple and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return type(value) is dict and all(type(k) is str for k in value)
    raise AssertionError(f"the test does not know the field type {hint}")


# --------------------------------------------------------------------------------------------
# The reported holes, one by one
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["trust_pickle", "report", "compile"])
@pytest.mark.parametrize("text", ['"false"', '"true"', '"no"', "0", "1"])
def test_a_boolean_key_takes_only_a_boolean(tmp_path, key, text):
    path = tmp_path / "run.toml"
    path.write_text(f"{key} = {text}\n")
    with pytest.raises(ConfigError, match=rf"config key '{key}' must be true or false, got "):
        RunConfig.from_toml(path)


def test_a_config_file_cannot_switch_on_unpickling(run_dirs, tmp_path, capsys):
    """The critical hole: ``trust_pickle = "false"`` read as truthy unpickled a hostile checkpoint."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": {"visual.conv1.weight": _Exploit(marker)}}, fh)
    config = tmp_path / "run.toml"
    config.write_text(f'model = "rbft-tiny-vit"\npretrained = {json.dumps(str(evil))}\nsuite = "synthetic"\n'
                      f'method = "zeroshot"\ntrust_pickle = "false"\nreport = false\n'
                      + "".join(f"{k} = {json.dumps(v)}\n" for k, v in run_dirs.items()))
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"robustbench-ft: error: {config}: config key 'trust_pickle' must be true or false, "
                   "got the string 'false'")
    assert not marker.exists()
    assert not Path(run_dirs["results_dir"]).exists()


@pytest.mark.parametrize("toml, message", [
    ('eval_batch_size = "256"', "config key 'eval_batch_size' must be a whole number, got the string '256'"),
    ("workers = 1.5", "config key 'workers' must be a whole number, got float 1.5"),
    ("seed = true", "config key 'seed' must be a whole number, got the boolean true"),
    ("device = 3", "config key 'device' must be a string, got int 3"),
    ("draft_factor = inf", "config key 'draft_factor' must be a number (or none), got float inf (it must be finite)"),
    ('precision = "fp16"', "config key 'precision' must be one of 'fp32', 'amp_bf16', got the string 'fp16'"),
    ("[report]\nx = 1", "config key 'report' must be true or false, got a table"),
    ('method_options = "x"', "config key 'method_options' must be a table, got the string 'x'"),
    ('[method]\nname = "finetune"\nepochs = "10"', "config key 'epochs' must be a number, got the string '10'"),
    ('[method]\nname = "finetune"\nmax_steps = 2.5', "config key 'max_steps' must be a whole number (or none)"),
    ('[method]\nname = "finetune"\n[method.lr]\nx = 1', "config key 'lr' must be a number, got a table"),
    ('[method]\nname = "zeroshot"\n[method.base_options]\nlr = 1', "method 'zeroshot' has no option(s) ['base_options']"),
    ('[method]\nname = "soup"\ningredient_seeds = "0,1"',
     "config key 'ingredient_seeds' must be a list of whole numbers, got the string '0,1'"),
    ('[method]\nname = "wise-ft"\nalpha = true', "config key 'alpha' must be a list of numbers, got the boolean true"),
    ("[method]\nname = 5", "config key 'method' must be a string, got int 5"),
])
def test_a_mistyped_config_file_is_one_clear_line(run_dirs, tmp_path, capsys, toml, message):
    path = tmp_path / "run.toml"
    path.write_text('model = "rbft-tiny-vit"\npretrained = "random"\nsuite = "synthetic"\n'
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in run_dirs.items() if k in ("results_dir",))
                    + toml + "\n")
    assert main(["run", "--config", str(path), "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not Path(run_dirs["results_dir"]).exists()


def test_python_values_are_held_to_the_same_types():
    with pytest.raises(ConfigError, match="config key 'trust_pickle' must be true or false, got the string 'false'"):
        RunConfig(trust_pickle="false")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="config key 'lr' must be a number, got the string '1e-4'"):
        get_method("finetune").make_options({"lr": "1e-4"})
    assert RunConfig(seed=3, draft_factor=2).draft_factor == 2.0  # an int is a number: widened, not refused
    assert get_method("soup").make_options({"ingredient_seeds": [0, 1]}).ingredient_seeds == (0, 1)


@pytest.mark.parametrize("argv, message", [
    (["--seed", "x"], "config key 'seed' must be a whole number, got the string 'x'"),
    (["--method", "finetune", "--lr", "nan"], "config key 'lr' must be a number, got float nan (it must be finite)"),
    (["--method", "soup", "--ingredient-seeds", "0,a"],
     "config key 'ingredient_seeds[1]' must be a whole number, got the string 'a'"),
    (["--seeds", "0,0"], "seeds must be distinct and at least one"),
    (["--method", "linear-probe", "--max-iter", "1e3"], "config key 'max_iter' must be a whole number"),
])
def test_command_line_text_is_parsed_as_the_field_declares(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run_config_from_argv(argv)


def test_command_line_text_becomes_typed_values():
    config = run_config_from_argv(["--method", "soup", "--ingredient-seeds", "0,1", "--lrs", "1e-5,3e-5", "--seed", "2",
                                   "--no-report", "--epochs", "3"])
    assert config.seed == 2 and config.report is False
    assert config.method_options == {"ingredient_seeds": (0, 1), "lrs": (1e-5, 3e-5), "base_options": {"epochs": 3.0}}
    assert run_config_from_argv(["--seeds", "0,1,2"]).seeds == (0, 1, 2)


# --------------------------------------------------------------------------------------------
# Fuzzed config files: no value reaches a field with another type
# --------------------------------------------------------------------------------------------

SCALARS = (st.booleans() | st.integers(-10 ** 6, 10 ** 6) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(["false", "true", "0", "1", "none", "", "2", "1e-4", "0:1:0.1", "auto", "skip", "fp32",
                              "rbft-tiny-vit", "random", "finetune", "a,b", "0,1"])
           | st.text(max_size=8) | st.dates())
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["lr", "epochs", "x", "name", "alpha"]), inner, max_size=2), max_leaves=4)
RUN_KEYS = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("method", "method_options")]
METHODS = [m.name for m in list_methods()]


@st.composite
def config_files(draw) -> str:
    top = {k: draw(VALUES) for k in draw(st.lists(st.sampled_from(RUN_KEYS), max_size=4, unique=True))}
    method = None
    if draw(st.booleans()):
        name = draw(st.sampled_from(METHODS))
        keys = [f.name for f in dataclasses.fields(get_method(name).options)] + ["bogus"]
        method = {"name": name, **{k: draw(VALUES) for k in draw(st.lists(st.sampled_from(keys), max_size=3,
                                                                            unique=True))}}
    return _toml(top, method)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_files())
def test_fuzzed_config_files_give_typed_fields_or_one_clear_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(text)
    try:
        config = RunConfig.from_toml(path)
        spec = get_method(config.method)
        options = spec.make_options(config.method_options)
        base_options = (get_method(options.base).make_options(options.base_options)
                        if "base_options" in field_hints(spec.options) else None)
    except (ConfigError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) else str(exc)
        assert message and "\n" not in message.strip()
        return
    for obj in (config, options, base_options):
        if obj is None:
            continue
        for name, hint in field_hints(type(obj)).items():
            assert conforms(getattr(obj, name), hint), (name, hint, getattr(obj, name))
