"""``brickwork route upcycle RECIPE OUT``: brickwork and mergekit-moe recipes on tiny Llamas."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

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
    "gate_mode_hidden_without_prompts": (
        lambda f: _mergekit(f, gate_mode="hidden", experts=_expert0(f, positive_prompts=["a"])),
        ["experts[1].positive_prompts", "gate_mode) hidden needs at least one prompt"],
    ),
    "gate_mode_default_is_hidden": (
        lambda f: {k: v for k, v in _mergekit(f, experts=_expert0(f)).items() if k != "gate_mode"},
        ["experts[0].positive_prompts", "hidden"],
    ),
    "gate_mode_uniform_random": (
        lambda f: _mergekit(f, gate_mode="uniform_random"),
        ["gate_mode 'uniform_random' is not supported"],
    ),
    "gate_mode_typo": (lambda f: _mergekit(f, gate_mode="rnadom"), ["Did you mean 'random'"]),
    "two_shared_experts": (
        lambda f: _mergekit(f, shared_experts=[{"source_model": str(f.base)}] * 2),
        ["shared_experts: exactly one shared expert"],
    ),
    "architecture": (
        lambda f: _mergekit(f, architecture="deepseek"),
        ["architecture 'deepseek' is not supported"],
    ),
    "shared_expert_with_mixtral": (
        lambda f: _brickwork(f, shared_expert={"model": str(f.base)}, format="mixtral"),
        ["shared_expert: Mixtral has no shared expert"],
    ),
    "task_without_examples": (
        lambda f: _brickwork(
            f,
            router_init="task",
            experts=[{"model": str(f.ft1), "examples": ["a"]}, {"model": str(f.ft2)}],
        ),  # fmt: skip
        ["experts[1].examples", "examples_file"],
    ),
    "examples_and_examples_file": (
        lambda f: _brickwork(
            f,
            experts=[
                {"model": str(f.ft1), "examples": ["a"], "examples_file": "x.txt"},
                {"model": str(f.ft2)},
            ],
        ),  # fmt: skip
        ["experts[0]", "examples or examples_file, not both"],
    ),
    "missing_examples_file": (
        lambda f: _brickwork(
            f,
            router_init="task",
            experts=[
                {"model": str(f.ft1), "examples_file": "nope.txt"},
                {"model": str(f.ft2), "examples": ["b"]},
            ],
        ),  # fmt: skip
        ["experts[0].examples_file 'nope.txt'", "cannot read"],
    ),
    "train_without_texts": (
        lambda f: _brickwork(f, router_init="train", router_train={"init": "random"}),
        ["router_train.texts", "unlabelled texts"],
    ),
    "router_train_without_train": (
        lambda f: _brickwork(f, router_init="random", router_train={"steps": 3}),
        ["router_train only applies to router_init: train"],
    ),
    "router_train_typo": (
        lambda f: _brickwork(f, router_init="train", router_train={"stpes": 3}),
        ["stpes", "Did you mean 'steps'"],
    ),
    "shared_expert_other_architecture": (
        lambda f: _brickwork(f, shared_expert={"model": str(f.bert)}),
        ["shared_expert", "model_type 'bert'"],
    ),
    "hidden_without_tokenizer": (
        lambda f: _brickwork(
            f,
            router_init="hidden",
            tokenizer=str(f.ft1),
            experts=[
                {"model": str(f.ft1), "positive_prompts": ["a"]},
                {"model": str(f.ft2), "positive_prompts": ["b"]},
            ],
        ),  # fmt: skip
        ["tokenizer", "cannot load a tokenizer"],
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
    "router_init_hidden": (
        lambda f: _brickwork(f, router_init="hidden"),
        ["experts[0].positive_prompts", "router_init (gate_mode) hidden"],
    ),
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
def test_bad_recipe_exits_2_names_culprit_writes_nothing(
    run_cli, tmp_path, llama_family, bert_family, case
):
    make, needles = BAD[case]
    fam = SimpleNamespace(**vars(llama_family), bert=bert_family.base)
    recipe = write_yaml(tmp_path / "moe.yaml", make(fam))
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


@pytest.fixture(scope="module")
def with_tokenizer(llama_family, tmp_path_factory):
    """``llama_family`` whose base has a real (character-level) tokenizer."""
    from .test_upcycle_routers import char_tokenizer

    root = tmp_path_factory.mktemp("tok")
    shutil.copytree(llama_family.base, root / "base")
    char_tokenizer().save_pretrained(root / "base")
    return SimpleNamespace(base=root / "base", ft1=llama_family.ft1, ft2=llama_family.ft2)


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_mergekit_prompt_gates_with_shared_expert(run_cli, tmp_path, with_tokenizer, gate_mode):
    f = with_tokenizer
    data = _mergekit(f, gate_mode=gate_mode, architecture="qwen")
    data["shared_experts"] = [{"source_model": str(f.base), "positive_prompts": ["general"]}]
    recipe = write_yaml(tmp_path / "moe.yaml", data)
    code, _, err = run_cli("route", "upcycle", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    settings = json.loads((tmp_path / "out" / "brickwork.json").read_text())["settings"]
    assert settings["router_init"] == gate_mode and settings["shared_expert_gate"] == "prompts"
    sd = load_file(tmp_path / "out" / "model.safetensors")
    gate = sd["model.layers.0.mlp.gate.weight"].float()  # (experts, hidden), unit rows
    torch.testing.assert_close(gate.norm(dim=-1), torch.ones(2), atol=1e-2, rtol=1e-2)
    shared_gate = sd["model.layers.0.mlp.shared_expert_gate.weight"].float()
    torch.testing.assert_close(shared_gate.norm(), torch.tensor(1.0), atol=1e-2, rtol=1e-2)


def test_task_and_train_recipes_read_example_files(run_cli, tmp_path, with_tokenizer):
    f = with_tokenizer
    (tmp_path / "digits.txt").write_text("0123 4567\n\n8901 2345\n")
    (tmp_path / "mixed.txt").write_text("0123 abcd\nefgh 4567\n99 zz\n")
    experts = [
        {"model": str(f.ft1), "examples_file": "digits.txt"},
        {"model": str(f.ft2), "examples": ["abcd efgh", "ijkl mnop"]},
    ]
    recipe = write_yaml(tmp_path / "task.yaml", _brickwork(f, router_init="task",
                        router_scale=2.0, experts=experts))  # fmt: skip
    code, _, err = run_cli("route", "upcycle", recipe, tmp_path / "task", "-q")
    assert code == 0, err
    stats = json.loads((tmp_path / "task" / "brickwork.json").read_text())["settings"]
    assert stats["router_stats"]["task_scale"] == 2.0
    _runs(tmp_path / "task", n_experts=2, top_k=2)
    train = {"init": "task", "steps": 3, "texts_file": "mixed.txt", "aux_loss_coef": 0.1}
    recipe = write_yaml(tmp_path / "train.yaml", _brickwork(f, router_init="train",
                        router_train=train, experts=experts, device="cpu"))  # fmt: skip
    code, _, err = run_cli("route", "upcycle", recipe, tmp_path / "train", "-q")
    assert code == 0, err
    stats = json.loads((tmp_path / "train" / "brickwork.json").read_text())["settings"]
    assert stats["router_stats"]["train_texts"] == 3 and stats["router_stats"]["train_steps"] == 3
    _runs(tmp_path / "train", n_experts=2, top_k=2)


def test_bert_recipe_writes_brickwork_format(run_cli, tmp_path, bert_family):
    import brickwork

    f = bert_family
    recipe = write_yaml(tmp_path / "moe.yaml", _brickwork(f, top_k=1, merge_method="linear"))
    code, _, err = run_cli("route", "upcycle", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "brickwork.json").read_text())
    assert meta["format"] == "brickwork.moe" and len(meta["moe"]) == 2
    model = brickwork.load(tmp_path / "out")
    with torch.no_grad():
        out = model(torch.arange(6)[None]).last_hidden_state
    assert out.shape == (1, 6, 32) and bool(torch.isfinite(out).all())
    recipe = write_yaml(tmp_path / "bad.yaml", _brickwork(f, router_init="train",
                        router_train={"init": "random", "texts": ["a"]}))  # fmt: skip
    code, _, err = run_cli("route", "upcycle", recipe, tmp_path / "bad", "-q")
    assert code == 2 and "router_train: not available for brickwork-format" in err
    assert str(recipe) in err and leftovers(tmp_path / "bad") == []


def test_mergekit_hidden_writes_mixtral_with_unit_router_rows(run_cli, tmp_path, with_tokenizer):
    recipe = write_yaml(tmp_path / "moe.yaml", _mergekit(with_tokenizer, gate_mode="hidden"))
    code, _, err = run_cli("route", "upcycle", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    _runs(tmp_path / "out", n_experts=2, top_k=2)
    sd = load_file(tmp_path / "out" / "model.safetensors")
    gate = sd["model.layers.1.block_sparse_moe.gate.weight"].float()  # bf16 (experts, hidden)
    torch.testing.assert_close(gate.norm(dim=-1), torch.ones(2), atol=1e-2, rtol=1e-2)
    assert not torch.allclose(gate[0], gate[1])  # "math" and "code" prompts differ


def test_upcycle_goes_through_the_writers_guarantees(run_cli, tmp_path, llama_family, monkeypatch):
    """Space check and stale staging cleanup are the shared writer's, so route has them too."""
    from brickwork.checkpoint import staging
    from brickwork.checkpoint import writer as writer_mod

    recipe = write_yaml(tmp_path / "moe.yaml", _brickwork(llama_family, top_k=1))
    out = tmp_path / "out"
    stale = tmp_path / (staging.staging_prefix(out) + "dead")
    stale.mkdir()
    (stale / staging.OWNER_FILE).write_text(json.dumps({**staging.owner_record(), "pid": -1}))
    monkeypatch.setattr(writer_mod, "free_bytes", lambda path: 100)
    code, _, err = run_cli("route", "upcycle", recipe, out)
    assert code == 2 and "not enough free space" in err and str(out) in err
    assert f"removed {stale}" in err and leftovers(out) == []
    monkeypatch.undo()
    code, _, err = run_cli("route", "upcycle", recipe, out)
    assert code == 0, err
    assert leftovers(out) == ["out"] and (out / "tokenizer_config.json").is_file()
