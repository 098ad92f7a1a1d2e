"""Parameters with mergekit's semantics: per model, global, per tensor (filters) and as
gradients over layers; precedence model > slice > global."""

from __future__ import annotations

import pytest
import torch

from brickwork.merge.api import merge_state_dicts
from brickwork.merge.plan import evaluate_setting
from brickwork.recipe import parse_recipe

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.2.self_attn.q_proj.weight",
    "model.layers.2.mlp.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def _family():
    """base = 0 everywhere, model i = (i+1) everywhere: task vectors are constants."""
    base = {n: torch.zeros(2, 3) for n in NAMES}
    models = [{n: torch.full((2, 3), float(i + 1)) for n in NAMES} for i in range(2)]
    return base, models


def _value(sd, name):
    v = sd[name]
    assert torch.allclose(v, v.reshape(-1)[0].expand_as(v)), name
    return v.reshape(-1)[0].item()


def test_global_per_model_parameter_applies_to_every_model():
    base, models = _family()
    out = merge_state_dicts("task_arithmetic", models, base=base, parameters={"weight": 0.5})
    assert _value(out, NAMES[1]) == pytest.approx(0.5 * 1 + 0.5 * 2)


def test_model_parameter_overrides_the_global_one():
    base, models = _family()
    out = merge_state_dicts(
        "task_arithmetic",
        models,
        base=base,
        parameters={"weight": 0.5},
        model_parameters=[{"weight": 2.0}, {}],
    )
    assert _value(out, NAMES[1]) == pytest.approx(2.0 * 1 + 0.5 * 2)


def test_filter_conditions_first_match_wins():
    base, models = _family()
    lam = [{"filter": "self_attn", "value": 0.2}, {"value": 0.8}]
    out = merge_state_dicts("task_arithmetic", models, base=base, parameters={"lambda": lam})
    for n in NAMES:
        expected = (0.2 if "self_attn" in n else 0.8) * 3
        assert _value(out, n) == pytest.approx(expected), n


def test_filter_without_fallback_uses_the_next_level_or_default():
    base, models = _family()
    out = merge_state_dicts(
        "task_arithmetic",
        models,
        base=base,
        model_parameters=[{"weight": [{"filter": "mlp", "value": 0.0}]}, {}],
        parameters={"weight": 1.0},
    )
    # model 0: weight 0 on mlp tensors; elsewhere its condition does not match -> global 1.0
    assert _value(out, "model.layers.1.mlp.up_proj.weight") == pytest.approx(0 * 1 + 1 * 2)
    assert _value(out, "model.layers.1.self_attn.q_proj.weight") == pytest.approx(1 * 1 + 1 * 2)


def test_gradient_is_interpolated_over_layers():
    base, models = _family()
    out = merge_state_dicts("task_arithmetic", models, base=base, parameters={"lambda": [0.0, 1.0]})
    # 3 layers: t = index / (3 − 1)
    for i, t in enumerate([0.0, 0.5, 1.0]):
        assert _value(out, f"model.layers.{i}.mlp.up_proj.weight") == pytest.approx(3 * t)


def test_gradient_with_several_anchor_points():
    base, models = _family()
    out = merge_state_dicts(
        "task_arithmetic", models, base=base, parameters={"lambda": [0.0, 1.0, 0.0]}
    )
    assert [
        _value(out, f"model.layers.{i}.self_attn.q_proj.weight") for i in range(3)
    ] == pytest.approx([0.0, 3.0, 0.0])


def test_gradient_puts_embeddings_at_the_start_and_head_at_the_end():
    """mergekit plans pre-layer weights at t=0 and post-layer weights (final norm, LM head) at t=1."""
    base, models = _family()
    out = merge_state_dicts("task_arithmetic", models, base=base, parameters={"lambda": [0.0, 1.0]})
    assert _value(out, "model.embed_tokens.weight") == pytest.approx(0.0)
    assert _value(out, "model.norm.weight") == pytest.approx(3.0)
    assert _value(out, "lm_head.weight") == pytest.approx(3.0)


def test_gradient_inside_a_filter_condition():
    base, models = _family()
    lam = [{"filter": "mlp", "value": [1.0, 0.0]}, {"value": 1.0}]
    out = merge_state_dicts("task_arithmetic", models, base=base, parameters={"lambda": lam})
    assert [_value(out, f"model.layers.{i}.mlp.up_proj.weight") for i in range(3)] == pytest.approx(
        [3.0, 1.5, 0.0]
    )
    assert _value(out, "model.layers.0.self_attn.q_proj.weight") == pytest.approx(3.0)


def test_evaluate_setting_matches_mergekit():
    from brickwork.recipe import Condition

    assert evaluate_setting(0.3, "x", 0.7) == 0.3
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([True, False], "x", 0.4) is True  # non-numeric: step, no interpolation
    conds = [Condition(filter="attn", value=1), Condition(filter="*", value=2)]
    assert evaluate_setting(conds, "a.attn.w", 0) == 1
    assert evaluate_setting(conds, "a.mlp.w", 0) == 2
    assert evaluate_setting([Condition(filter="attn", value=1)], "mlp", 0) is None


def test_gradient_values_are_validated_at_recipe_time():
    from brickwork.errors import RecipeError

    with pytest.raises(RecipeError, match="density"):
        parse_recipe(
            {
                "method": "ties",
                "base": "b",
                "models": [{"model": "a"}],
                "parameters": {"density": [0.2, 1.5]},
            }
        )


def test_global_only_parameter_refused_per_model():
    from brickwork.errors import RecipeError

    with pytest.raises(RecipeError, match="global parameter"):
        parse_recipe(
            {
                "method": "ties",
                "base": "b",
                "models": [{"model": "a", "parameters": {"lambda": 0.5}}],
            }
        )


def test_slice_parameters_and_per_slice_gradients():
    """In a slices: recipe t runs over each slice's own layers; the source's parameters win
    over the slice's, which win over the global ones."""
    from brickwork.checkpoint.reader import StateDictCheckpoint
    from brickwork.merge.executor import execute
    from brickwork.merge.plan import build_plan

    base, models = _family()
    ckpts = {
        "base": StateDictCheckpoint(base),
        "a": StateDictCheckpoint(models[0]),
        "b": StateDictCheckpoint(models[1]),
    }
    recipe = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "parameters": {"lambda": 1.0, "weight": 1.0},
            "slices": [
                {
                    "sources": [
                        {"model": "base", "layer_range": [0, 3]},
                        {"model": "a", "layer_range": [0, 3], "parameters": {"weight": 0.5}},
                        {"model": "b", "layer_range": [0, 3]},
                    ],
                    "parameters": {"lambda": [0.0, 1.0]},
                }
            ],
        }
    )

    class Sink:
        tensors: dict = {}

        def write(self, name, t):
            self.tensors[name] = t

    plan = build_plan(recipe, ckpts)
    sink = Sink()
    execute(plan, ckpts, sink, progress=False)
    for i, t in enumerate([0.0, 0.5, 1.0]):
        assert _value(sink.tensors, f"model.layers.{i}.mlp.up_proj.weight") == pytest.approx(
            t * (0.5 * 1 + 1.0 * 2)
        )
