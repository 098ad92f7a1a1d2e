"""Recipe validation (pydantic, extra=forbid) from Python: the same rules as the CLI."""

from __future__ import annotations

import pytest

from brickwork.errors import RecipeError
from brickwork.recipe import parse_recipe


def _bad(data, *needles):
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_valid_recipes():
    r = parse_recipe({"method": "ties", "base": "b", "models": [{"model": "a"}, {"model": "c"}]})
    assert r.model_paths() == ["b", "a", "c"]
    mk = parse_recipe(
        {"merge_method": "linear", "models": [{"model": "a"}], "dtype": "bf16", "base_model": "a"}
    )
    assert mk.method == "linear" and mk.dtype == "bfloat16" and mk.base == "a"
    assert (
        parse_recipe(
            {"merge_method": "linear", "models": [{"model": "a"}], "dtype": "float64"}
        ).compute_dtype
        == "float64"
    )


def test_structure_errors():
    _bad({"method": "linear"}, "models", "slices")
    _bad({"method": "linear", "models": []}, "empty")
    _bad(
        {
            "method": "linear",
            "models": [{"model": "a"}],
            "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}],
        },
        "exactly one",
    )
    _bad({"models": [{"model": "a"}]}, "method")
    _bad(["a"], "mapping")
    _bad({"method": "ties", "models": [{"model": "a"}]}, "needs a base", "base")
    _bad({"method": "linear", "models": [{"model": "a"}], "on_missing": "ignore"}, "on_missing")


def test_slice_checks():
    def sl(*ranges):
        return {
            "merge_method": "linear",
            "slices": [
                {
                    "sources": [
                        {"model": f"m{i}", "layer_range": list(r)} for i, r in enumerate(ranges)
                    ]
                }
            ],
        }

    _bad(sl((0, 2), (0, 3)), "same number of layers")
    _bad(sl((2, 2)), "layer_range")


def test_mergekit_unsupported_keys_are_named():
    _bad(
        {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"source": "union"}},
        "tokenizer",
    )
    _bad(
        {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "union"},
        "tokenizer_source",
    )
    _bad({"merge_method": "linear", "models": [{"model": "a"}], "weird": 1}, "weird")


def test_parameter_type_errors_name_the_parameter():
    _bad(
        {"method": "linear", "models": [{"model": "a", "parameters": {"weight": "heavy"}}]},
        "weight",
        "heavy",
    )
    _bad(
        {
            "method": "ties",
            "base": "b",
            "models": [{"model": "a"}],
            "parameters": {"lambda": float("nan")},
        },
        "lambda",
    )
    _bad(
        {
            "method": "ties",
            "base": "b",
            "models": [{"model": "a"}],
            "parameters": {"density": [{"filter": "x", "value": 0}]},
        },
        "density",
    )
