"""Fuzzing recipes (issue 8): whatever a recipe holds, brickwork either merges it into an
output that loads, or fails with a BrickworkError (exit 2 from the CLI) whose message is one
short paragraph, and writes nothing: no output, no ``.OUT.tmp-*`` directory beside it.

Recipes come in both forms (brickwork ``method:`` and mergekit ``merge_method:``), with
random structure, wrong types and values, unknown and misspelt keys, model paths that exist
(tiny safetensors checkpoints) and paths that do not; plus YAML that is no mapping, invalid
YAML and binary junk. The examples are bounded so that this file runs in well under 30 s on
one core. Every bug the fuzzer found has an explicit regression test at the end. The strategies
are in tests/_fuzz.py; BRICKWORK_FUZZ_SCALE=20 searches twenty times longer.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from _fuzz import BAD_YAML, any_recipe, make_zoo, moefy_recipes, upcycle_recipes
from _helpers import leftovers, write_yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from brickwork import merge
from brickwork.errors import BrickworkError, RecipeError
from brickwork.recipe import load_recipe, parse_recipe


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    return make_zoo(tmp_path_factory.mktemp("fuzz_zoo"))


# -- the property -----------------------------------------------------------------------------


def _check_message(msg: str) -> None:
    """One short paragraph: no traceback, no blank line, bounded length."""
    assert "Traceback (most recent call last)" not in msg, msg
    assert "\n\n" not in msg.strip(), msg
    assert msg.strip(), "empty error message"
    assert len(msg) <= 2000 and msg.count("\n") <= 16, msg


def _check_nothing_written(out: Path) -> None:
    assert leftovers(out) == [], f"written after an error: {leftovers(out)}"


def _check_output(out: Path) -> None:
    from brickwork.checkpoint.reader import open_checkpoint

    assert leftovers(out) == [out.name], leftovers(out)
    ck = open_checkpoint(out)
    assert ck.names, "the output has no tensors"
    for n in ck.names:
        ck.get(n)
    assert (out / "brickwork.json").is_file()


def _cli(*args: str | os.PathLike) -> tuple[int, str]:
    """``brickwork ARGS`` in-process: (exit code, stderr). Other exceptions propagate."""
    from brickwork.cli import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, err.getvalue()


@contextlib.contextmanager
def _scratch(root: Path):
    d = Path(tempfile.mkdtemp(dir=root))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _cli_case(args: list, out: Path, *, may_succeed: bool = True) -> None:
    code, err = _cli(*args)
    event(f"exit {code}")
    if code == 0 and may_succeed:
        _check_output(out)
        return
    assert code == 2, f"exit {code}: {err}"
    assert err.startswith("error: "), err
    _check_message(err)
    _check_nothing_written(out)


#: BRICKWORK_FUZZ_SCALE=20 runs twenty times as many examples (a deeper search, minutes).
_SCALE = float(os.environ.get("BRICKWORK_FUZZ_SCALE", "1"))


def _n(examples: int) -> int:
    return max(1, round(examples * _SCALE))


FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@settings(FUZZ, max_examples=_n(120))
@given(data=st.data())
def test_fuzz_python_api(zoo, tmp_path, data):
    recipe = data.draw(any_recipe(zoo), label="recipe")
    dtype = data.draw(st.one_of(st.none(), st.sampled_from(["bfloat16", "int8", "fp16", ""])))
    with _scratch(tmp_path) as d:
        out = d / "out"
        try:
            merge(recipe, out, dtype=dtype, progress=False)
        except BrickworkError as e:
            event(type(e).__name__)
            _check_message(str(e))
            _check_nothing_written(out)
        else:
            event("merged")
            _check_output(out)


@settings(FUZZ, max_examples=_n(100))
@given(data=st.data())
def test_fuzz_cli_merge(zoo, tmp_path, data):
    kind = data.draw(st.sampled_from(["recipe", "recipe", "recipe", "bad_yaml", "text", "bytes"]))
    if kind == "recipe":
        payload = yaml.safe_dump(data.draw(any_recipe(zoo), label="recipe"))
    elif kind == "bad_yaml":
        payload = data.draw(st.sampled_from(BAD_YAML))
    elif kind == "text":
        payload = data.draw(st.text(max_size=40))
    else:
        payload = data.draw(st.binary(max_size=64))
    options = data.draw(
        st.lists(
            st.sampled_from(
                [
                    ("--dtype", "bfloat16"),
                    ("--dtype", "int8"),
                    ("--shard-size", "1KB"),
                    ("--shard-size", "lots"),
                    ("--shard-size", "0"),
                    ("--seed", "-3"),
                    ("--force",),
                ]
            ),
            max_size=2,
        )
    )
    with _scratch(tmp_path) as d:
        r = d / "recipe.yaml"
        if isinstance(payload, bytes):
            r.write_bytes(payload)
        else:
            r.write_text(payload, encoding="utf-8")
        out = d / "out"
        _cli_case(["merge", r, out, "-q", *[x for o in options for x in o]], out)


@settings(FUZZ, max_examples=_n(20))
@given(which=st.sampled_from(["missing", "dir", "empty"]))
def test_fuzz_cli_recipe_path(zoo, tmp_path, which):
    with _scratch(tmp_path) as d:
        r = {"missing": d / "nope.yaml", "dir": d, "empty": d / "empty.yaml"}[which]
        if which == "empty":
            r.write_text("")
        out = d / "out"
        _cli_case(["merge", r, out, "-q"], out, may_succeed=False)


# -- route upcycle / moefy: parsing and the checks before any model is loaded ----------------


@settings(FUZZ, max_examples=_n(60))
@given(data=st.data())
def test_fuzz_route_upcycle_cli(zoo, tmp_path, data):
    kind = data.draw(st.sampled_from(["recipe", "recipe", "recipe", "bad_yaml", "bytes"]))
    if kind == "recipe":
        payload = yaml.safe_dump(data.draw(upcycle_recipes(zoo), label="recipe"))
    elif kind == "bad_yaml":
        payload = data.draw(st.sampled_from(BAD_YAML))
    else:
        payload = data.draw(st.binary(max_size=64))
    with _scratch(tmp_path) as d:
        r = d / "moe.yaml"
        r.write_bytes(payload) if isinstance(payload, bytes) else r.write_text(payload)
        out = d / "out"
        _cli_case(["route", "upcycle", r, out, "-q"], out, may_succeed=False)


@settings(FUZZ, max_examples=_n(50))
@given(data=st.data())
def test_fuzz_route_moefy_cli(zoo, tmp_path, data):
    kind = data.draw(st.sampled_from(["recipe", "recipe", "recipe", "bad_yaml", "bytes"]))
    if kind == "recipe":
        payload = yaml.safe_dump(data.draw(moefy_recipes(zoo), label="recipe"))
    elif kind == "bad_yaml":
        payload = data.draw(st.sampled_from(BAD_YAML))
    else:
        payload = data.draw(st.binary(max_size=64))
    with _scratch(tmp_path) as d:
        r = d / "moefy.yaml"
        r.write_bytes(payload) if isinstance(payload, bytes) else r.write_text(payload)
        out = d / "out"
        _cli_case(["route", "moefy", r, out, "-q"], out, may_succeed=False)


# -- regressions: what the fuzzer found, and every recipe error path, naming the culprit -------


def _bad(parse, data, *needles: str, source: str = "<recipe>") -> str:
    with pytest.raises(RecipeError) as e:
        parse(data)
    msg = str(e.value)
    _check_message(msg)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert msg.count(source) == 1, f"the source is named once: {msg!r}"
    return msg


@pytest.mark.parametrize("command", [["merge"], ["route", "upcycle"], ["route", "moefy"]])
def test_binary_recipe_file_names_the_file(tmp_path, command):
    # was: UnicodeDecodeError traceback (b"\x80")
    r = tmp_path / "recipe.yaml"
    r.write_bytes(b"\x80\x04junk\x00")
    code, err = _cli(*command, r, tmp_path / "out", "-q")
    assert code == 2 and str(r) in err and "UTF-8" in err and "0x80" in err, err
    _check_message(err)
    _check_nothing_written(tmp_path / "out")


def test_empty_slices_is_a_recipe_error():
    # was: IndexError in the planner ({'method': 'breadcrumbs', 'slices': []})
    _bad(parse_recipe, {"merge_method": "passthrough", "slices": []}, "'slices' is empty")
    _bad(parse_recipe, {"method": "breadcrumbs", "base": "b", "slices": []}, "'slices' is empty")


@pytest.mark.parametrize(
    "data",
    [
        {"merge_method": "breadcrumbs", "base_model": "", "models": [{"model": "a"}]},
        {"method": "ties", "base": "", "models": [{"model": "a"}]},
        {"method": "linear", "models": [{"model": ""}]},
        {"merge_method": "linear", "slices": [{"sources": [{"model": "", "layer_range": [0, 1]}]}]},
    ],
)
def test_empty_model_path_names_the_field(data, tmp_path):
    # was: KeyError: '' in the planner (an empty base was never opened)
    field = "base_model" if "base_model" in data else "base" if "base" in data else "model"
    msg = _bad(parse_recipe, data, field, "at least 1 character")
    assert "''" in msg
    with pytest.raises(RecipeError):
        merge(data, tmp_path / "out", progress=False)
    _check_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_parameter_values_are_refused(value, zoo, tmp_path):
    # was: a merge full of inf / nan, written without a word (weight: .inf)
    recipe = {"method": "linear", "models": [{"model": str(zoo["ft1"])}]}
    recipe["models"][0]["parameters"] = {"weight": value}
    _bad(parse_recipe, recipe, "models[0].parameters", "'weight'", "finite")
    with pytest.raises(RecipeError, match="weight"):
        merge(recipe, tmp_path / "out", progress=False)
    _check_nothing_written(tmp_path / "out")
    grad = {"method": "linear", "models": [{"model": "a"}], "parameters": {"weight": [1.0, value]}}
    _bad(parse_recipe, grad, "'weight'", "finite")


def test_no_method_key_names_the_source_once():
    # was: "<recipe>: <recipe>: the recipe has no 'method' key"
    _bad(parse_recipe, {"models": [{"model": "a"}]}, "no 'method' key")
    _bad(parse_recipe, {"metod": "linear", "models": []}, "Did you mean 'method'")


def test_a_wrong_parameter_value_is_one_line_naming_it():
    # was: one line per member of the union (bool, int, float, str, list, Condition, ...)
    msg = _bad(
        parse_recipe,
        {"method": "linear", "models": [{"model": "a", "parameters": {"weight": [[1, 2]]}}]},
        "models[0].parameters.weight[0]",
        "got a list",
    )
    assert msg.count("\n") == 1, msg
    msg = _bad(
        parse_recipe,
        {"method": "linear", "models": [{"model": "a"}], "parameters": {"weight": {"value": {}}}},
        "parameters.weight.value",
        "got a mapping",
    )
    assert msg.count("\n") == 1, msg
    _bad(
        parse_recipe,
        {
            "method": "linear",
            "models": [{"model": "a"}],
            "parameters": {"weight": [{"fliter": "x"}]},
        },
        "parameters.weight[0]: unknown key 'fliter'. Did you mean 'filter'?",
        "parameters.weight[0].value: required field is missing",
    )


def test_an_empty_gradient_is_refused():
    # was: silently ignored (the default was used)
    _bad(
        parse_recipe,
        {"method": "linear", "models": [{"model": "a", "parameters": {"weight": []}}]},
        "models[0].parameters.weight",
        "at least 1 item",
    )


def test_long_values_are_shortened_in_messages():
    # was: a 5000-character value repeated in the message
    long = "x" * 5000
    for data, needle in (
        (
            {"method": "linear", "models": [{"model": "a", "parameters": {"weight": long}}]},
            "weight",
        ),
        ({"method": "linear", "models": [{"model": "a"}], "seed": long}, "seed"),
    ):
        msg = _bad(parse_recipe, data, needle, "5002 characters")
        assert len(msg) < 400, msg


def test_a_key_of_another_level_is_not_suggested_as_itself():
    # was: "model: unknown key 'model'. Did you mean 'model'?"
    msg = _bad(
        parse_recipe,
        {"method": "linear", "model": "a", "models": [{"model": "a"}]},
        "unknown key 'model'",
        "another part of the recipe",
    )
    assert "Did you mean 'model'" not in msg
    msg = _bad(
        parse_recipe,
        {"method": "linear", "models": [{"model": "a", "moodel": "b"}]},
        "models[0]: unknown key 'moodel'. Did you mean 'model'?",
    )


def test_missing_tensors_of_another_architecture_are_one_line(zoo, tmp_path):
    # was: one line per tensor, each with the same advice (13 lines, 2,300 characters)
    out = tmp_path / "out"
    recipe = {
        "merge_method": "model_stock",
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["mlp"])}, {"model": str(zoo["ft1"])}],
    }
    with pytest.raises(BrickworkError) as e:
        merge(recipe, out, progress=False)
    msg = str(e.value)
    _check_message(msg)
    assert f"{zoo['mlp']} lacks 11 tensor(s) that {zoo['base']} has: 'lm_head.weight'" in msg
    assert "on_missing" in msg and msg.count("\n") <= 3 and len(msg) < 900, msg
    _check_nothing_written(out)


def test_slices_whose_base_lacks_the_first_source_tensors_are_a_clear_error(zoo, tmp_path):
    # found by test_fuzz_python_api: the non-layer tensors come from the first source (an
    # MLP) and the reference, the base, lacks them: was a KeyError from the reader
    out = tmp_path / "out"
    recipe = {
        "method": "breadcrumbs",
        "slices": [{"sources": [{"model": str(zoo["mlp"]), "layer_range": [0, 1]},
                                {"model": str(zoo["ft1"]), "layer_range": [0, 1]}]}],
        "base": str(zoo["base"]),
    }  # fmt: skip
    with pytest.raises(BrickworkError) as e:
        merge(recipe, out, progress=False)
    msg = str(e.value)
    _check_message(msg)
    assert f"{zoo['base']} lacks" in msg and f"that {zoo['mlp']} has" in msg, msg
    _check_nothing_written(out)


def test_recipe_errors_name_the_field():
    """The recipe checks no other test reaches, each naming its field."""
    m = [{"model": "a"}]
    _bad(
        parse_recipe,
        {"method": "ties", "base": "b", "models": [{"model": "a", "parameters": {"lambda": 1}}]},
        "models[0].parameters",
        "'lambda' is a global parameter",
        "top-level 'parameters'",
    )
    for key in ("modules", "chat_template"):
        _bad(parse_recipe, {"merge_method": "linear", "models": m, key: "x"}, f"'{key}'")
    _bad(
        parse_recipe,
        {"method": "linear", "models": [{"parameters": {}}]},
        "models[0].model",
        "missing",
    )
    _bad(parse_recipe, {"method": 3, "models": m}, "method", "valid string")
    _bad(parse_recipe, {"method": "linear", "models": []}, "'models' is empty")
    _bad(parse_recipe, {"method": "linear", "models": m, "seed": 0.5}, "seed", "0.5")
    _bad(parse_recipe, {"method": "linear", "models": m, 3: 4}, "[3]", "Keys should be strings")


def test_plan_errors_name_the_models(zoo, tmp_path):
    base, ft1, ft2 = (str(zoo[k]) for k in ("base", "ft1", "ft2"))
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="method 'ties': every model is the base"):
        merge({"method": "ties", "base": base, "models": [{"model": base}]}, out, progress=False)
    sources = [{"model": ft1, "layer_range": [0, 2]}, {"model": ft2, "layer_range": [0, 2]}]
    recipe = {"merge_method": "ties", "base_model": base, "slices": [{"sources": sources}]}
    with pytest.raises(BrickworkError) as e:
        merge(recipe, out, progress=False)
    assert "slices[0]" in str(e.value) and base in str(e.value), e.value
    _check_nothing_written(out)


def test_upcycle_recipe_errors_name_the_field(zoo, tmp_path):
    from brickwork.route.recipe import parse_upcycle_recipe, upcycle_from_recipe

    two = [{"model": "a"}, {"model": "b"}]
    p = parse_upcycle_recipe
    _bad(
        p,
        {"base": "b", "experts": two, "router_std": 0.1, "router_init": "task"},
        "router_std only applies",
    )
    _bad(p, {"base": "b", "experts": two, "router_scale": 2.0}, "router_scale only applies")
    _bad(
        p,
        {"base": "b", "experts": two, "merge_parameters": {"weight": 1}},
        "merge_parameters is given without merge_method",
    )
    _bad(
        p,
        {
            "base": "b",
            "experts": two,
            "router_init": "train",
            "router_train": {"texts": ["a"], "texts_file": "t"},
        },
        "router_train",
        "texts or texts_file, not both",
    )
    mk = {"base_model": "b", "experts": [{"source_model": "a"}, {"source_model": "c"}]}
    _bad(p, {**mk, "dtype": "int8"}, "dtype 'int8'")
    _bad(p, {**mk, "gate_mode": "hiden"}, "gate_mode 'hiden'", "Did you mean 'hidden'")
    _bad(
        p,
        {
            "base": "b",
            "experts": two,
            "merge_method": "linear",
            "merge_parameters": {"weight": float("inf")},
        },
        "'weight'",
        "finite",
    )
    # files of examples are read before any model is opened
    for name, needle in (("blank", "no non-empty line"), ("binary", "not UTF-8 text")):
        # binary was: UnicodeDecodeError traceback
        recipe = p(
            {
                "base": "b",
                "router_init": "task",
                "experts": [
                    {"model": "a", "examples_file": str(zoo[name])},
                    {"model": "c", "examples": ["x"]},
                ],
            }
        )
        with pytest.raises(RecipeError) as e:
            upcycle_from_recipe(recipe, tmp_path / "out", recipe_dir=tmp_path)
        msg = str(e.value)
        _check_message(msg)
        assert "experts[0].examples_file" in msg and str(zoo[name]) in msg and needle in msg, msg
    _check_nothing_written(tmp_path / "out")


def test_moefy_recipe_errors_name_the_field(zoo, tmp_path):
    from brickwork.route.moefy_recipe import parse_moefy_recipe, run_moefy

    ok = {"model": "m", "n_experts": 4, "top_k": 2, "calibration": {"text": "c.txt"}}
    _bad(
        parse_moefy_recipe, {**ok, "router_hidden": 8}, "router_hidden only applies to router: mlp"
    )
    _bad(
        parse_moefy_recipe,
        {k: v for k, v in ok.items() if k != "calibration"},
        "calibration: required field is missing",
    )
    _bad(
        parse_moefy_recipe,
        {**ok, "calibration": {"text": "c", "lines": 0}},
        "calibration.lines",
        "greater than or equal to 1",
    )
    for name, needle in (("blank", "no non-empty line"), ("binary", "UTF-8")):
        r = write_yaml(
            tmp_path / "m.yaml",
            {**ok, "model": str(zoo["hfdir"]), "calibration": {"text": str(zoo[name])}},
        )
        with pytest.raises(RecipeError) as e:
            run_moefy(r, tmp_path / "out", progress=False)
        msg = str(e.value)
        _check_message(msg)
        assert "calibration.text" in msg and str(zoo[name]) in msg and needle in msg, msg
    r = write_yaml(tmp_path / "m.yaml", {**ok, "model": str(zoo["empty"])})
    with pytest.raises(BrickworkError, match="no config.json"):
        run_moefy(r, tmp_path / "out", progress=False)
    _check_nothing_written(tmp_path / "out")


def test_load_recipe_names_the_file(tmp_path):
    r = write_yaml(
        tmp_path / "r.yaml", {"method": "linear", "models": [{"model": "a", "paramters": {}}]}
    )
    msg = _bad(load_recipe, r, "models[0]: unknown key 'paramters'", source=str(r))
    assert msg.startswith(f"{r}: ")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"method": "linear", "\n\n": None, "models": [{"model": "a"}]}, r"unknown key '\n\n'"),
        ({"method": "linear", "models": [{"model": "a\n\nb"}]}, r"'model' = 'a\n\nb'"),
        ({"method": "li\n\nnear", "models": [{"model": "a"}]}, r"'method' = 'li\n\nnear'"),
        ({"merge_method": "linear", "dtype": "\n\n", "models": [{"model": "a"}]}, "'dtype'"),
        (
            {"method": "linear", "models": [{"model": "a", "parameters": {"w\n\n": 1}}]},
            r"'w\n\n' is not a parameter",
        ),
        (
            {"method": "linear", "models": [{"model": "a", "parameters": {"w\n\n": {}}}]},
            r"models[0].parameters.'w\n\n'.value",
        ),
    ],
)
def test_control_characters_are_quoted_never_printed(data, needle):
    # was: a key '\n\n' printed as is: a blank line in the middle of the message
    msg = _bad(parse_recipe, data, needle)
    assert "\n\n" not in msg and all(line.strip() for line in msg.splitlines()), msg


def test_route_recipes_refuse_control_characters_and_empty_paths():
    from brickwork.route.moefy_recipe import parse_moefy_recipe
    from brickwork.route.recipe import parse_upcycle_recipe

    two = [{"model": "a"}, {"model": "b"}]
    _bad(parse_upcycle_recipe, {"base": "", "experts": two}, "base", "at least 1 character")
    _bad(parse_upcycle_recipe, {"base": "b\n", "experts": two}, r"'base' = 'b\n'")
    ok = {"model": "m", "n_experts": 4, "top_k": 2, "calibration": {"text": ""}}
    _bad(parse_moefy_recipe, ok, "calibration.text", "at least 1 character")
