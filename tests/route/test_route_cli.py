"""``brickwork route upcycle RECIPE OUT``: brickwork and mergekit-moe recipes on tiny Llamas."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import leftovers, write_yaml
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")


def _brickwork(fam, **overrides) -> dict:
    return {
        "base": str(fam.base),
        "experts": [{"model": str(fam.ft1)}, {"model": str(fam.ft2)}],
        **overrides,
    }


def _mergekit(fam, **overrides) -> dict:
    return {
        "base_model": str(fam.base),
        "gate_mode": "random",
        "dtype": "bfloat16",
        "experts": [
            {"source_model": str(fam.ft1), "positive_prompts": ["math"]},
            {"source_model": str(fam.ft2), "positive_prompts": ["code"], "negative_prompts": ["x"]},
        ],
        **overrides,
    }


def _runs(out, n_experts: int, top_k: int) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == n_experts
    assert model.config.num_experts_per_tok == top_k
    with torch.no_grad():
        logits = model(torch.arange(6)[None]).logits
    assert logits.shape == (1, 6, 128) and bool(torch.isfinite(logits.float()).all())


def test_brickwork_recipe_upcycles(run_cli, tmp_path, llama_family):
    recipe = write_yaml(
        tmp_path / "moe.yaml", _brickwork(llama_family, merge_method="linear", top_k=1)
    )
    code, stdout, err = run_cli("route", "upcycle", recipe, tmp_path / "out", "--seed", "3")
    assert code == 0, err
    assert "wrote" in stdout
    _runs(tmp_path / "out", n_experts=2, top_k=1)
    settings = json.loads((tmp_path / "out" / "brickwork.json").read_text())["settings"]
    assert settings["seed"] == 3 and settings["merge_method"] == "linear"


def test_mergekit_moe_recipe_as_is(run_cli, tmp_path, llama_family):
    recipe = write_yaml(tmp_path / "moe.yaml", _mergekit(llama_family, experts_per_token=2))
    code, stdout, err = run_cli("route", "upcycle", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    assert stdout == ""
    sd = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    _runs(tmp_path / "out", n_experts=2, top_k=2)


def test_existing_output_needs_force(run_cli, tmp_path, llama_family):
    recipe = write_yaml(tmp_path / "moe.yaml", _brickwork(llama_family))
    (tmp_path / "out").mkdir()
    code, _, err = run_cli("route", "upcycle", recipe, tmp_path / "out", "-q")
    assert code == 2 and "already exists" in err
    code, _, err = run_cli("route", "upcycle", recipe, tmp_path / "out", "-q", "--force")
    assert code == 0, err
    assert (tmp_path / "out" / "config.json").is_file()


def _expert0(fam, **kw):
    return [{"source_model": str(fam.ft1), **kw}, {"source_model": str(fam.ft2)}]


BAD = {
    "misspelt_key": (
        lambda f: _brickwork(f, merge_methd="linear"),
        ["merge_methd", "'merge_method'"],
    ),
    "misspelt_mergekit_key": (
        lambda f: _mergekit(f, experts_per_tokn=1),
        ["experts_per_tokn", "'experts_per_token'"],
    ),
    "misspelt_expert_key": (
        lambda f: {**_mergekit(f), "experts": [{"sorce_model": "a"}, {"source_model": "b"}]},
        ["experts[0]", "sorce_model", "'source_model'"],
    ),
    "gate_mode_hidden": (
        lambda f: _mergekit(f, gate_mode="hidden"),
        ["gate_mode 'hidden' is not supported yet", "gate_mode: random"],
    ),
    "gate_mode_default_is_hidden": (
        lambda f: {k: v for k, v in _mergekit(f).items() if k != "gate_mode"},
        ["no gate_mode given, and mergekit's default gate_mode 'hidden' is not supported"],
    ),
    "gate_mode_cheap_embed": (
        lambda f: _mergekit(f, gate_mode="cheap_embed"),
        ["gate_mode 'cheap_embed' is not supported yet"],
    ),
    "gate_mode_typo": (lambda f: _mergekit(f, gate_mode="rnadom"), ["Did you mean 'random'"]),
    "shared_experts": (
        lambda f: _mergekit(f, shared_experts=[{"source_model": str(f.base)}]),
        ["shared_experts is not supported yet"],
    ),
    "noise_scale": (
        lambda f: _mergekit(f, experts=_expert0(f, noise_scale=0.1)),
        ["experts[0].noise_scale"],
    ),
    "one_expert": (lambda f: _brickwork(f, experts=[{"model": str(f.ft1)}]), ["experts"]),
    "top_k_too_big": (lambda f: _brickwork(f, top_k=3), ["top_k", "got 3"]),
    "unknown_method": (lambda f: _brickwork(f, merge_method="tie"), ["Did you mean 'ties'"]),
    "bad_merge_parameter": (
        lambda f: _brickwork(f, merge_method="linear", merge_parameters={"wieght": 1}),
        ["'wieght'", "Did you mean 'weight'"],
    ),
    "router_init_hidden": (lambda f: _brickwork(f, router_init="hidden"), ["router_init 'hidden'"]),
    "missing_model": (
        lambda f: _brickwork(f, experts=[{"model": str(f.ft1)}, {"model": "/nope/ft"}]),
        ["experts[1] '/nope/ft'", "no such file"],
    ),
    "hub_id": (
        lambda f: _mergekit(f, base_model="mistralai/Mistral-7B-v0.1"),
        ["mistralai/Mistral-7B-v0.1", "never downloads"],
    ),
    "not_a_mapping": (lambda f: [1, 2], ["a mapping"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_exits_2_names_culprit_writes_nothing(run_cli, tmp_path, llama_family, case):
    make, needles = BAD[case]
    recipe = write_yaml(tmp_path / "moe.yaml", make(llama_family))
    out = tmp_path / "out"
    code, stdout, err = run_cli("route", "upcycle", recipe, out, "-q")
    assert code == 2, stdout + err
    assert err.startswith("error: ") and "Traceback" not in err
    assert str(recipe) in err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert leftovers(out) == []


def test_missing_recipe_file(run_cli, tmp_path):
    code, _, err = run_cli("route", "upcycle", tmp_path / "nope.yaml", tmp_path / "out")
    assert code == 2
    assert "nope.yaml" in err and "cannot read the recipe" in err
    assert leftovers(tmp_path / "out") == []
