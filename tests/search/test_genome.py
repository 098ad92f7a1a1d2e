"""The search's genome, configs and optimisers (no Ray)."""

from __future__ import annotations

import pytest
import torch

from brickwork.errors import RecipeError
from brickwork.merge.api import merge_recipe_in_memory, merge_state_dicts
from brickwork.recipe import parse_recipe
from brickwork.search.config import OptimizerSpec, parse_search_config
from brickwork.search.genome import Genome
from brickwork.search.optimizers import make_optimizer


def _cfg(**genome):
    g = {"merge_method": "ties", "base_model": "base", "models": ["a", "b"], **genome}
    return parse_search_config({"genome": g, "evaluator": {"callable": "m:f"}})


def _states(n_layers=4):
    g = torch.Generator().manual_seed(1)
    names = [f"model.layers.{i}.w" for i in range(n_layers)] + ["model.embed_tokens.weight"]
    return {m: {n: torch.randn(4, 4, generator=g) for n in names} for m in ("base", "a", "b")}


def test_genes_per_group_model_and_filter():
    cfg = _cfg(layer_granularity=2, parameters=["weight", "density", "lambda"],
               filters=["mlp", "attn"])  # fmt: skip
    g = Genome(cfg.genome, n_layers=4)
    # 2 groups x (2 per-model params x 2 models + 1 global) x 3 parameter sets
    assert g.dims == 2 * (2 * 2 + 1) * 3
    r = g.recipe([0.5] * g.dims)
    w = r["models"][1]["parameters"]["weight"]
    assert [c.get("filter") for c in w] == ["mlp", "attn", None]
    assert w[0]["value"] == [0.5, 0.5, 0.5, 0.5]  # one point per layer
    assert r["parameters"]["lambda"][2] == {"value": [1.0] * 4}  # middle of [0, 2]
    assert r["parameters"]["normalize"] is True  # mergekit-evolve's default for ties
    parse_recipe(r)  # an ordinary recipe


def test_point_maps_onto_bounds_and_recipe_merges_per_layer_group():
    cfg = _cfg(merge_method="task_arithmetic", layer_granularity=2, parameters=["weight"],
               bounds={"weight": [-1.0, 3.0]})  # fmt: skip
    g = Genome(cfg.genome, n_layers=4)
    x = [0.25, 0.5, 0.75, 1.0]  # group 0: a, b; group 1: a, b
    r = g.recipe(x)
    assert [m["parameters"]["weight"] for m in r["models"]] == [[0, 0, 2, 2], [1, 1, 3, 3]]
    st = _states()
    merged = merge_recipe_in_memory(r, st)
    b, a, bb = st["base"], st["a"], st["b"]
    for layer, (wa, wb) in {0: (0.0, 1.0), 1: (0.0, 1.0), 2: (2.0, 3.0), 3: (2.0, 3.0)}.items():
        n = f"model.layers.{layer}.w"
        want = b[n] + wa * (a[n] - b[n]) + wb * (bb[n] - b[n])
        torch.testing.assert_close(merged[n], want)
    n = "model.embed_tokens.weight"  # outside the layers: the first layer's values
    torch.testing.assert_close(merged[n], b[n] + 0.0 * (a[n] - b[n]) + 1.0 * (bb[n] - b[n]))


def test_groups_cover_the_layers_a_checkpoint_holds():
    g = Genome(_cfg(layer_granularity=1).genome, n_layers=6, layers=[4, 5])  # BERT layers 4-5
    assert g.n_groups == 2 and g.dims == 2 * 2 * 2
    x = [0.0] * 4 + [1.0] * 4  # group 0 (layer 4): weight, density 0...; group 1: all 1
    w = g.recipe(x)["models"][0]["parameters"]["weight"]
    assert w == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_smooth_genome_is_a_gradient_and_one_group_is_scalars():
    g = Genome(_cfg(layer_granularity=2, smooth=True).genome, n_layers=4)
    r = g.recipe([0.0] * g.dims)
    assert r["models"][0]["parameters"]["weight"] == [0.0, 0.0]  # one point per group
    g1 = Genome(_cfg().genome, n_layers=4)
    r1 = g1.recipe(g1.x0())
    assert r1["models"][0]["parameters"] == {"weight": 0.5, "density": 1.0}  # 1/n, density 1


def test_in_memory_merge_equals_merge_state_dicts():
    st = _states()
    r = {"method": "ties", "base": "base", "parameters": {"density": 0.5},
         "models": [{"model": "a", "parameters": {"weight": 0.3}}, {"model": "b"}]}  # fmt: skip
    got = merge_recipe_in_memory(r, st)
    want = merge_state_dicts("ties", [st["a"], st["b"]], base=st["base"],
                             parameters={"density": 0.5},
                             model_parameters=[{"weight": 0.3}, {}])  # fmt: skip
    assert got.keys() == want.keys()
    for k in got:
        assert torch.equal(got[k], want[k])


@pytest.mark.parametrize(
    ("genome", "match"),
    [
        ({"merge_method": "no_such"}, "no_such"),
        ({"bounds": {"weight": [1.0, 0.0]}}, "lower bound"),
        ({"parameters": ["weight", "alpha"]}, "has no parameter 'alpha'"),
        ({"fixed": {"colour": 1}}, "has no parameter 'colour'"),
        ({"layer_granularity": 3}, "does not divide"),
        ({"merge_method": "regmean"}, "needs calibration data"),
        ({"merge_method": "tsv_m"}, "say which parameters"),
        ({"parameters": ["weight"], "fixed": {"weight": 1.0}}, "both searched"),
        ({"bounds": {"density": [0.0, 1.0]}}, "not a valid value"),
    ],
)
def test_bad_genomes_are_clear_errors(genome, match):
    with pytest.raises(RecipeError, match=match):
        Genome(_cfg(**genome).genome, n_layers=4)


def test_bad_config_fields_name_the_field():
    with pytest.raises(RecipeError, match="evaluator"):
        parse_search_config({"genome": {"merge_method": "ties", "models": ["a"]}, "evaluator": {}})
    with pytest.raises(RecipeError, match="package.module:function"):
        parse_search_config({"genome": {"merge_method": "ties", "models": ["a"]},
                             "evaluator": {"callable": "nocolon"}})  # fmt: skip
    with pytest.raises(RecipeError, match="max_evals"):
        parse_search_config({"genome": {"merge_method": "ties", "models": ["a"]},
                             "evaluator": {"callable": "m:f"}, "max_evals": 0})  # fmt: skip


def test_mergekit_evolve_config_is_accepted():
    evolve = {
        "genome": {"models": [{"model": "a"}, "b"], "merge_method": "dare_ties",
                   "base_model": "base", "layer_granularity": 2, "normalize": False,
                   "allow_negative_weights": True, "smooth": False, "filters": ["mlp"]},
        "tasks": [{"name": "gloss_pos", "weight": 1.0}, "word_pos"],
    }  # fmt: skip
    cfg = parse_search_config(evolve)
    assert cfg.evaluator.bench_task == ["gloss_pos", "word_pos"] and cfg.evaluator.suite == "text"
    g = Genome(cfg.genome, n_layers=4)
    assert g.bounds["weight"] == (-1.0, 1.0) and g.fixed["normalize"] is False
    lm = parse_search_config({**evolve, "tasks": ["arc_easy_train"], "limit": 10})
    assert lm.evaluator.lm_eval == [{"name": "arc_easy_train"}]
    assert lm.evaluator.options == {"limit": 10}


def test_lm_eval_tasks_without_lm_eval_are_a_clear_error():
    pytest.importorskip("ray")
    try:
        import lm_eval  # noqa: F401

        pytest.skip("lm-eval is installed")
    except ImportError:
        pass
    from brickwork.search.evaluators import make_evaluator

    cfg = parse_search_config({"genome": {"merge_method": "ties", "models": ["a"]},
                               "tasks": ["hellaswag_train"]})  # fmt: skip
    with pytest.raises(RecipeError, match="lm-eval is not installed"):
        make_evaluator(cfg.evaluator, reference=None, models=["a"], base_dir=None)


@pytest.mark.parametrize("name", ["cma", "random", "tpe"])
def test_optimizers_are_seeded_and_replayable(name):
    pytest.importorskip({"cma": "cma", "random": "numpy", "tpe": "optuna"}[name])
    spec = OptimizerSpec(name=name, seed=3, batch=4)

    def run(stop_after: int | None = None, replay=None):
        opt = make_optimizer(spec, 5, [0.5] * 5)
        seen = []
        for b in range(3):
            xs = opt.ask()
            if replay is not None:
                assert xs == replay[b]  # the same proposals, batch after batch
            seen.append(xs)
            opt.tell(xs, [-sum((v - 0.2) ** 2 for v in x) for x in xs])
        return seen

    first = run()
    assert run(replay=first) == first
    assert all(0.0 <= v <= 1.0 for xs in first for x in xs for v in x)
    other = make_optimizer(OptimizerSpec(name=name, seed=4, batch=4), 5, [0.5] * 5)
    if name != "cma":  # CMA-ES's first batch is around x0 but still seeded: compare batch 2
        assert other.ask() != first[0] or name == "tpe"


def test_cma_moves_towards_the_optimum():
    pytest.importorskip("cma")
    opt = make_optimizer(OptimizerSpec(name="cma", seed=0), 4, [0.9] * 4)
    best = float("-inf")
    for _ in range(25):
        xs = opt.ask()
        s = [-sum((v - 0.2) ** 2 for v in x) for x in xs]
        best = max(best, *s)
        opt.tell(xs, s)
    assert best > -0.01  # from -1.96 at x0
