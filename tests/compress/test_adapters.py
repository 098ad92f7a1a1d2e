"""PEFT LoRA adapters as merge inputs (AdapterCheckpoint, `model+lora`) and adapter merging
with PEFT's add_weighted_adapter semantics (agreement tests against peft itself)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from brickwork.checkpoint.reader import open_checkpoint
from brickwork.compress.adapters import AdapterCheckpoint, merge_adapters
from brickwork.errors import CheckpointError, MergeComputationError

peft = pytest.importorskip("peft", reason="peft (dev extra) is needed for the agreement tests")

torch.set_num_threads(1)

TARGETS_1 = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
TARGETS_2 = ["q_proj", "k_proj", "down_proj", "embed_tokens"]


def _load_base(base: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(base).eval()


def _make_adapter(base: Path, out: Path, seed: int, **kw) -> Path:
    """A random LoRA (init_lora_weights=False: B is not zero) made by peft itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_load_base(base), LoraConfig(init_lora_weights=False, **kw))
    with torch.no_grad():  # LoRA factors of a realistic size relative to the weights
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(0.3)
            elif "modules_to_save" in n:  # a "trained" copy of the module
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def adapters(llama_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a1 = _make_adapter(
        llama_family.base, root / "a1", 1, r=4, lora_alpha=8, target_modules=TARGETS_1,
        modules_to_save=["lm_head"],
    )  # fmt: skip
    a2 = _make_adapter(
        llama_family.base, root / "a2", 2, r=4, lora_alpha=4, target_modules=TARGETS_2,
        use_rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 12},
    )  # fmt: skip
    a3 = _make_adapter(
        llama_family.base, root / "a3", 3, r=2, lora_alpha=2, target_modules=["q_proj"]
    )
    return a1, a2, a3


def _merged_and_unloaded(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    m = PeftModel.from_pretrained(_load_base(base), adapter).merge_and_unload()
    return {k: v.detach() for k, v in m.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# -- AdapterCheckpoint --------------------------------------------------------------------


@pytest.mark.parametrize("i", [0, 1])
def test_adapter_checkpoint_equals_peft_merge_and_unload(llama_family, adapters, i):
    ck = AdapterCheckpoint(open_checkpoint(llama_family.base), adapters[i])
    ref = _merged_and_unloaded(llama_family.base, adapters[i])
    ours = {n: ck.get(n) for n in ck.names}
    assert _max_diff(ours, ref) < 1e-5
    base = open_checkpoint(llama_family.base)
    changed = {n for n in ck.names if not torch.equal(ours[n], base.get(n))}
    want = {
        f"model.layers.{k}.{m}.weight"
        for k in range(2)
        for m in (
            ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
            if i == 0
            else ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]
        )
    } | {"model.embed_tokens.weight"}
    assert changed == want | ({"lm_head.weight"} if i == 0 else set())


def test_adapter_checkpoint_gpt2_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D stores (in, out): the delta is (B @ A)ᵀ, as merge_and_unload does."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=32)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    lcfg = LoraConfig(
        r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    get_peft_model(base, lcfg).save_pretrained(tmp_path / "ad")
    ck = AdapterCheckpoint(open_checkpoint(tmp_path / "base"), tmp_path / "ad")
    fresh = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    ref = PeftModel.from_pretrained(fresh, tmp_path / "ad").merge_and_unload().state_dict()
    names = [n for n in ck.names if n in ref]
    assert any("c_attn.weight" in n for n in names)
    assert max(float((ck.get(n) - ref[n]).abs().max()) for n in names) < 1e-5


def test_adapter_on_wrong_base_is_a_clear_error(adapters, tmp_path, llama_config_factory):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(llama_config_factory(hidden_size=48, num_attention_heads=4)).save_pretrained(
        tmp_path / "other"
    )
    with pytest.raises(CheckpointError, match=r"does not fit base .*other.*q_proj.*base shape"):
        AdapterCheckpoint(open_checkpoint(tmp_path / "other"), adapters[0])


# -- adapters as merge inputs --------------------------------------------------------------


def _merge(recipe: dict | Path, out: Path) -> dict[str, torch.Tensor]:
    import brickwork

    brickwork.merge(recipe, out, progress=False)
    ck = open_checkpoint(out)
    return {n: ck.get(n).clone() for n in ck.names}


def _save_merged(base: Path, adapter: Path, out: Path) -> Path:
    from peft import PeftModel

    m = PeftModel.from_pretrained(_load_base(base), adapter).merge_and_unload()
    m.save_pretrained(out)
    return out


def test_linear_merge_of_adapter_models_equals_merge_of_merged_models(
    llama_family, adapters, tmp_path
):
    a1, a2, _ = adapters
    m1 = _save_merged(llama_family.base, a1, tmp_path / "m1")
    m2 = _save_merged(llama_family.base, a2, tmp_path / "m2")
    explicit = _merge(
        {"method": "linear", "models": [{"model": str(m1)}, {"model": str(m2)}, {"model": str(llama_family.ft1)}]},
        tmp_path / "explicit",
    )  # fmt: skip
    # a1 by mergekit's model+lora syntax, a2 alone (its base from base_model_name_or_path)
    via = _merge(
        {"method": "linear", "models": [{"model": f"{llama_family.base}+{a1}"}, {"model": str(a2)}, {"model": str(llama_family.ft1)}]},
        tmp_path / "via",
    )  # fmt: skip
    assert _max_diff(via, explicit) < 1e-5
    assert (tmp_path / "via" / "config.json").is_file()


def test_model_plus_lora_in_mergekit_yaml(llama_family, adapters, tmp_path):
    a1 = adapters[0]
    (tmp_path / "base").symlink_to(llama_family.base)
    (tmp_path / "lora").symlink_to(a1)
    (tmp_path / "ft").symlink_to(llama_family.ft1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: linear\nmodels:\n"
        "  - model: ./base+./lora\n    parameters: {weight: 0.7}\n"
        "  - model: ./ft\n    parameters: {weight: 0.3}\n"
    )
    got = _merge(recipe, tmp_path / "out")
    m1 = _merged_and_unloaded(llama_family.base, a1)
    ft = open_checkpoint(llama_family.ft1)
    want = {n: 0.7 * m1[n] + 0.3 * ft.get(n) for n in ft.names}
    assert _max_diff(got, want) < 1e-5


def test_adapter_base_not_local_is_a_clear_error(adapters, tmp_path):
    import shutil

    import brickwork

    ad = tmp_path / "ad"
    shutil.copytree(adapters[2], ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"its base 'meta-llama/Llama-3.2-1B'.*BASE\+"):
        brickwork.merge({"method": "linear", "models": [{"model": str(ad)}]}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# -- merging adapters: agreement with PEFT's add_weighted_adapter --------------------------


def _peft_merged(base: Path, ads, weights, combination_type, seed=None, **kw):
    """PEFT's add_weighted_adapter on the same adapters; returns (state dict, module order).

    For DARE, the global RNG is seeded right after PEFT initialises the new adapter (by
    wrapping its `_freeze_adapter`, called between the two) so that the draws are
    comparable with ours; PEFT's arithmetic is untouched."""
    import peft.tuners.lora.model as lm
    from peft import PeftModel, get_peft_model_state_dict

    model = PeftModel.from_pretrained(_load_base(base), ads[0], adapter_name="a0")
    for i, a in enumerate(ads[1:], 1):
        model.load_adapter(a, adapter_name=f"a{i}")
    orig = lm._freeze_adapter

    def freeze_then_seed(*args):
        orig(*args)
        if seed is not None:
            torch.manual_seed(seed)

    lm._freeze_adapter = freeze_then_seed
    try:
        model.add_weighted_adapter(
            [f"a{i}" for i in range(len(ads))],
            weights,
            "m",
            combination_type=combination_type,
            **kw,
        )
    finally:
        lm._freeze_adapter = orig
    sd = get_peft_model_state_dict(model, adapter_name="m")
    order = [n for n, _ in model.base_model.model.named_modules()]
    return {k: v.detach() for k, v in sd.items() if "lora_" in k}, order


CASES = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 3}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.4}),
    ("magnitude_prune_svd", {"density": 0.4}),
    ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.6}),
    ("dare_ties_svd", {"density": 0.6}),
]


@pytest.mark.parametrize(("combination_type", "kw"), CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_merge_adapters_agrees_with_peft(llama_family, adapters, combination_type, kw):
    ads, weights = adapters[:2], [0.7, -0.4]
    seed = 5 if combination_type.startswith("dare") else None
    ref, order = _peft_merged(llama_family.base, ads, weights, combination_type, seed, **kw)
    got = merge_adapters(ads, weights, combination_type, seed=seed or 0, module_order=order, **kw)
    lora = {k: v for k, v in got.tensors.items() if "lora_" in k}
    assert _max_diff(lora, ref) < 1e-5
    r = {"cat": 8, "svd": kw.get("svd_rank", 4)}.get(combination_type.removesuffix("_svd"), 4)
    assert got.config["r"] == got.config["lora_alpha"] == (3 if "svd_rank" in kw else r)


def test_cat_of_different_ranks_agrees_with_peft_and_adds_deltas(llama_family, adapters):
    ads, weights = [adapters[0], adapters[2]], [1.5, 0.5]
    ref, _ = _peft_merged(llama_family.base, ads, weights, "cat")
    got = merge_adapters(ads, weights, "cat")
    assert _max_diff({k: v for k, v in got.tensors.items() if "lora_" in k}, ref) < 1e-6
    # cat is exact: the merged delta is the weighted sum of the deltas (scale 1 after merging)
    from brickwork.compress.adapters import Adapter

    a1, a3 = Adapter(ads[0]), Adapter(ads[1])
    name = "model.layers.0.self_attn.q_proj"
    A = got.tensors[a1.modules[name].a]
    B = got.tensors[a1.modules[name].b]
    want = 1.5 * a1.delta(a1.modules[name]) + 0.5 * a3.delta(a3.modules[name])
    assert torch.allclose(B @ A, want, atol=1e-6)


def test_merged_adapter_loads_in_peft_and_matches_peft_outputs(llama_family, adapters, tmp_path):
    from peft import PeftModel

    # adapters without modules_to_save: PEFT's merged adapter would get a fresh copy of the
    # base's lm_head where brickwork carries the adapter's (a documented difference); the
    # rslora adapter second, because PEFT's merged adapter copies the first one's use_rslora
    # (scaling its already-scaled delta by sqrt(r)), where brickwork writes use_rslora: false
    ads, weights = [adapters[2], adapters[1]], [0.6, 0.4]
    got = merge_adapters(ads, weights, "svd")
    out = got.save(tmp_path / "merged")
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "brickwork.json").read_text())["combination_type"] == "svd"
    ids = torch.arange(12).reshape(2, 6)
    loaded = PeftModel.from_pretrained(_load_base(llama_family.base), out).eval()
    ref_model = PeftModel.from_pretrained(_load_base(llama_family.base), ads[0], adapter_name="a0")
    ref_model.load_adapter(ads[1], adapter_name="a1")
    ref_model.add_weighted_adapter(["a0", "a1"], weights, "m", combination_type="svd")
    ref_model.set_adapter("m")
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref_model.eval()(ids).logits, atol=1e-5)


def test_merge_adapters_carries_modules_to_save(adapters):
    from brickwork.compress.adapters import Adapter

    got = merge_adapters(adapters[:2], [0.5, 0.5], "svd")
    key = Adapter(adapters[0]).replaced["lm_head.weight"]
    assert torch.equal(got.tensors[key], Adapter(adapters[0]).tensors.get(key))
    assert got.config["modules_to_save"] == ["lm_head"]


def test_merge_adapters_errors(adapters):
    with pytest.raises(MergeComputationError, match="equal rank"):
        merge_adapters([adapters[0], adapters[2]], [1, 1], "linear")
    with pytest.raises(MergeComputationError, match="needs density"):
        merge_adapters(adapters[:2], [1, 1], "ties")
    with pytest.raises(MergeComputationError, match="Did you mean 'ties'"):
        merge_adapters(adapters[:2], [1, 1], "tie")
    with pytest.raises(MergeComputationError, match="2 weights for 3 adapters"):
        merge_adapters(adapters, [1, 1], "cat")


def test_one_adapter_model_applied_by_linear_loads_in_transformers(
    llama_family, adapters, tmp_path
):
    from transformers import LlamaForCausalLM

    a1 = adapters[0]
    got = _merge(
        {"method": "linear", "models": [{"model": f"{llama_family.base}+{a1}"}]}, tmp_path / "o"
    )
    assert _max_diff(got, _merged_and_unloaded(llama_family.base, a1)) < 1e-6
    LlamaForCausalLM.from_pretrained(tmp_path / "o")


def test_data_aware_merge_and_align_of_adapter_inputs_run_the_adapted_model(
    llama_family, adapters, tmp_path
):
    """regmean (statistics from running the models) and align: read BASE+ADAPTER as the
    adapted network: the same result as with the adapter merged into its base first."""
    from safetensors.torch import save_file

    ids = torch.randint(0, 64, (48, 12), generator=torch.Generator().manual_seed(3))
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    data = {"path": str(tmp_path / "ids.safetensors"), "n_examples": 48, "batch_size": 16}
    merged = _save_merged(llama_family.base, adapters[0], tmp_path / "m1")
    ft1 = str(llama_family.ft1)
    for extra in ({}, {"align": {"to": ft1}}):
        recipe = {"method": "regmean", "models": [{"model": ft1, "data": data}], **extra}
        via = _merge(
            {**recipe, "models": [*recipe["models"],
                                  {"model": f"{llama_family.base}+{adapters[0]}", "data": data}]},
            tmp_path / f"via{len(extra)}",
        )  # fmt: skip
        explicit = _merge(
            {**recipe, "models": [*recipe["models"], {"model": str(merged), "data": data}]},
            tmp_path / f"explicit{len(extra)}",
        )
        assert _max_diff(via, explicit) < 1e-5, extra
    base_only = _merge(
        {"method": "regmean", "models": [{"model": ft1, "data": data},
                                         {"model": str(llama_family.base), "data": data}]},
        tmp_path / "base_only",
    )  # fmt: skip
    assert _max_diff(via, base_only) > 1e-4  # the adapter did take part


def test_cli_merge_adapters(adapters, tmp_path, run_cli):
    from safetensors.torch import load_file

    out = tmp_path / "merged"
    code, stdout, err = run_cli(
        "compress", "merge-adapters", adapters[0], adapters[1], "--out", out,
        "--weight", "0.7", "--weight", "-0.4", "--type", "ties", "--density", "0.5",
    )  # fmt: skip
    assert code == 0, err
    assert "rank 4" in stdout
    want = merge_adapters(adapters[:2], [0.7, -0.4], "ties", density=0.5).tensors
    got = load_file(out / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_cli_merge_adapters_errors(adapters, tmp_path, run_cli):
    code, _, err = run_cli(
        "compress", "merge-adapters", adapters[0], adapters[1], "--out", tmp_path / "o",
        "--weight", "1",
    )  # fmt: skip
    assert code != 0 and "--weight given 1 times for 2 adapters" in err
    code, _, err = run_cli(
        "compress", "merge-adapters", adapters[0], adapters[1], "--out", adapters[0], "--force"
    )
    assert code != 0 and "never writes over its inputs" in err
    assert (adapters[0] / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "o").exists()


def test_model_plus_lora_with_a_missing_base_names_both(adapters, tmp_path):
    import brickwork

    key = f"{tmp_path / 'nobase'}+{adapters[0]}"
    with pytest.raises(
        CheckpointError, match=r"base '.*nobase' and adapter '.*a1'.*does not exist"
    ):
        brickwork.merge({"method": "linear", "models": [{"model": key}]}, tmp_path / "o")


def test_adapter_checkpoint_formula_written_out(llama_family, adapters):
    """W + alpha/sqrt(r) * B @ A for the rslora adapter's k_proj (rank_pattern r = 2) and
    down_proj (alpha_pattern alpha = 12, r = 4); embeddings W + alpha/sqrt(r) (B @ A)ᵀ."""
    from safetensors.torch import load_file

    sd = load_file(adapters[1] / "adapter_model.safetensors")
    base = open_checkpoint(llama_family.base)
    ck = AdapterCheckpoint(base, adapters[1])
    p = "base_model.model.model."
    for module, alpha, r in (
        ("layers.1.self_attn.k_proj", 4, 2),
        ("layers.0.mlp.down_proj", 12, 4),
    ):
        A, B = sd[f"{p}{module}.lora_A.weight"], sd[f"{p}{module}.lora_B.weight"]
        assert A.shape[0] == r
        want = base.get(f"model.{module}.weight") + alpha / r**0.5 * B @ A
        assert torch.allclose(ck.get(f"model.{module}.weight"), want, atol=1e-6)
    A, B = sd[f"{p}embed_tokens.lora_embedding_A"], sd[f"{p}embed_tokens.lora_embedding_B"]
    want = sd[f"{p}embed_tokens.base_layer.weight"] + 4 / 4**0.5 * (B @ A).T
    assert torch.allclose(ck.get("model.embed_tokens.weight"), want, atol=1e-6)
