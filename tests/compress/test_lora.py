"""LoRA extraction (brickwork compress lora): full rank reproduces the fine-tune in PEFT,
rank r is the best rank-r approximation (Eckart–Young), energy ranks are minimal, filters,
errors, inputs untouched."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from brickwork.compress.lora import extract_lora

peft = pytest.importorskip("peft")

X = torch.tensor([[1, 5, 7, 9, 3, 2, 11]])


def _tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """A tiny GPT-2 (Conv1D, tied LM head) base and a perturbed fine-tune."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2lora")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    )
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    base.save_pretrained(root / "base")
    ft.save_pretrained(root / "ft")
    return root / "base", root / "ft"


def _family(name, request):
    if name == "gpt2":
        base, ft = request.getfixturevalue("gpt2_pair")
        from transformers import GPT2LMHeadModel as cls
    elif name == "llama":
        fam = request.getfixturevalue("llama_family")
        base, ft = fam.base, fam.ft1
        from transformers import LlamaForCausalLM as cls
    else:
        fam = request.getfixturevalue("bert_family")
        base, ft = fam.base, fam.ft1
        from transformers import BertModel as cls
    return base, ft, cls


def _peft(cls, base: Path, adapter: Path):
    model = cls.from_pretrained(base).eval()
    return peft.PeftModel.from_pretrained(model, adapter).eval()


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_full_rank_reproduces_the_finetune_in_peft(name, request, tmp_path):
    base, ft, cls = _family(name, request)
    before = _tree_hash(ft), _tree_hash(base)
    out = extract_lora(ft, tmp_path / "a", base=base, energy=1.0)
    assert (_tree_hash(ft), _tree_hash(base)) == before  # inputs untouched
    ref = cls.from_pretrained(ft).eval()
    pm = _peft(cls, base, out)
    with torch.no_grad():
        want = ref(input_ids=X)[0]
        got = pm(input_ids=X)[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        if name != "gpt2":  # tied head: PEFT's merge applies the shared delta twice (README)
            merged = pm.merge_and_unload()(input_ids=X)[0]
            torch.testing.assert_close(merged, want, atol=1e-4, rtol=0)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(base.resolve())
    assert cfg["modules_to_save"]  # the perturbed norms
    assert (out / "brickwork.json").is_file() and (out / "README.md").is_file()


def _delta(ft: Path, base: Path, weight: str) -> torch.Tensor:
    a = load_file(ft / "model.safetensors")[weight].double()
    b = load_file(base / "model.safetensors")[weight].double()
    return a - b


def test_rank_r_is_the_best_rank_r_approximation(llama_family, tmp_path):
    """Eckart–Young: BA equals U_r S_r V_rᵀ of the delta, error sqrt(Σ_{i>r} s_i²)."""
    r = 3
    out = extract_lora(llama_family.ft1, tmp_path / "a", base=llama_family.base, rank=r)
    sd = load_file(out / "adapter_model.safetensors")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == r and cfg["lora_alpha"] == r and cfg["rank_pattern"] == {}
    checked = 0
    for module in cfg["target_modules"]:
        pre = f"base_model.model.{module}"
        if module.endswith("embed_tokens"):
            ba = (sd[f"{pre}.lora_embedding_B"].double() @ sd[f"{pre}.lora_embedding_A"].double()).T
        else:
            ba = sd[f"{pre}.lora_B.weight"].double() @ sd[f"{pre}.lora_A.weight"].double()
        delta = _delta(llama_family.ft1, llama_family.base, f"{module}.weight")
        u, s, vh = torch.linalg.svd(delta if not module.endswith("embed_tokens") else delta.T,
                                    full_matrices=False)  # fmt: skip
        best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        best = best.T if module.endswith("embed_tokens") else best
        assert (ba - best).abs().max() < 1e-5, module
        err = torch.linalg.matrix_norm(delta - ba)
        assert err == pytest.approx(s[r:].pow(2).sum().sqrt().item(), rel=1e-4), module
        checked += 1
    assert checked == 16  # 2 layers x 7 projections + embed_tokens + lm_head


def test_energy_ranks_are_minimal(llama_family, tmp_path):
    e = 0.9
    out = extract_lora(llama_family.ft1, tmp_path / "a", base=llama_family.base, energy=e)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    sd = load_file(out / "adapter_model.safetensors")
    for module in cfg["target_modules"]:
        rank = cfg["rank_pattern"].get(module, cfg["r"])
        delta = _delta(llama_family.ft1, llama_family.base, f"{module}.weight")
        s2 = torch.linalg.svdvals(delta) ** 2
        kept = s2.cumsum(0) / s2.sum()
        assert kept[rank - 1] >= e and (rank == 1 or kept[rank - 2] < e), module
        key = "lora_embedding_A" if module.endswith("embed_tokens") else "lora_A.weight"
        assert sd[f"base_model.model.{module}.{key}"].shape[0] == rank
    assert len(set(cfg["rank_pattern"].values()) | {cfg["r"]}) > 1  # ranks do differ
    pm = _peft(__import__("transformers").LlamaForCausalLM, llama_family.base, out)
    assert torch.isfinite(pm(input_ids=X).logits).all()


def test_filters(llama_family, tmp_path):
    out = extract_lora(
        llama_family.ft1, tmp_path / "a", base=llama_family.base, rank=2, include=["*.q_proj", "re:mlp\\.(up|down)"],
        exclude=["model.layers.1.*"],
    )  # fmt: skip
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.q_proj",
    ]
    assert cfg["modules_to_save"] is None


def test_cli_and_errors(run_cli, llama_family, gpt2_pair, tmp_path):
    ft, base = llama_family.ft1, llama_family.base
    code, out, err = run_cli(
        "compress", "lora", ft, tmp_path / "ok", "--base", base, "--rank", "2", "-q"
    )
    assert code == 0, out + err
    assert (tmp_path / "ok" / "adapter_model.safetensors").is_file()
    # output exists
    code, _, err = run_cli("compress", "lora", ft, tmp_path / "ok", "--base", base, "--rank", "2")
    assert code != 0 and "already exists" in err
    # rank larger than a matrix: names the module and the limit, nothing written
    code, _, err = run_cli("compress", "lora", ft, tmp_path / "big", "--base", base, "--rank", "20")
    assert code != 0 and "k_proj" in err and "at most 16" in err
    assert not (tmp_path / "big").exists()
    # base of another architecture
    g2_base, _ = gpt2_pair
    code, _, err = run_cli(
        "compress", "lora", ft, tmp_path / "mm", "--base", g2_base, "--rank", "2"
    )
    assert code != 0 and "does not match base" in err and not (tmp_path / "mm").exists()
    # output inside an input
    code, _, err = run_cli("compress", "lora", ft, ft / "adapter", "--base", base, "--rank", "2")
    assert code != 0 and "overlaps input" in err and not (ft / "adapter").exists()
    # both / neither of --rank and --energy; energy out of range
    code, _, err = run_cli("compress", "lora", ft, tmp_path / "x", "--base", base)
    assert code != 0 and "exactly one" in err
    code, _, err = run_cli(
        "compress", "lora", ft, tmp_path / "x", "--base", base, "--energy", "1.5"
    )
    assert code != 0 and "(0, 1]" in err
    # the base itself as fine-tune: nothing to extract
    code, _, err = run_cli("compress", "lora", base, tmp_path / "x", "--base", base, "--rank", "1")
    assert code != 0 and "nothing to extract" in err


def test_adapter_on_a_mismatched_base_is_refused_by_shape(
    llama_family, llama_config_factory, tmp_path
):
    """An adapter whose base does not match: a base of the same names but other shapes."""
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM(llama_config_factory(intermediate_size=48))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(Exception, match="fine-tune shape") as e:
        extract_lora(llama_family.ft1, tmp_path / "a", base=tmp_path / "other", rank=2)
    assert "mlp.gate_proj" in str(e.value)


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (5000, 20), (20, 5000)])
def test_factors_of_a_rank_deficient_delta(shape):
    """A rank-5 delta (e.g. a merged LoRA): full rank is finite and exact; rank 5 is exact too;
    B = U S^½, A = S^½ Vᵀ (B's columns and A's rows have the same norms, sqrt(s_i))."""
    from brickwork.compress.lora import _Delta, _factors

    g = torch.Generator().manual_seed(0)
    m = torch.randn(shape[0], 5, generator=g) @ torch.randn(5, shape[1], generator=g)
    for r in (min(shape), 5):
        b, a = _factors(_Delta(m, torch.zeros_like(m), "linear"), r)
        assert b.shape == (shape[0], r) and a.shape == (r, shape[1])
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        torch.testing.assert_close(b @ a, m, atol=1e-4, rtol=0)
    s = torch.linalg.svdvals(m.double())[:5]
    torch.testing.assert_close(b.double().norm(dim=0), s.sqrt(), rtol=1e-4, atol=0)
    torch.testing.assert_close(a.double().norm(dim=1), s.sqrt(), rtol=1e-4, atol=0)


def test_tied_head_without_its_lora_reproduces_once_merged(gpt2_pair, tmp_path):
    """--exclude lm_head on a tied GPT-2: merging the embedding's LoRA updates the shared
    weight, so the merged model is the fine-tune (the unmerged one is not: README)."""
    from transformers import GPT2LMHeadModel

    base, ft = gpt2_pair
    out = extract_lora(ft, tmp_path / "a", base=base, energy=1.0, exclude=["lm_head"])
    assert "lm_head" not in json.loads((out / "adapter_config.json").read_text())["target_modules"]
    with torch.no_grad():
        want = GPT2LMHeadModel.from_pretrained(ft).eval()(input_ids=X)[0]
        merged = _peft(GPT2LMHeadModel, base, out).merge_and_unload()(input_ids=X)[0]
    torch.testing.assert_close(merged, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_lora_factors_are_the_best_rank_r_approximation(kind):
    from brickwork.compress import lora_factors

    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 20, generator=g)
    ft = base + torch.randn(12, 20, generator=g) * 0.1
    b, a = lora_factors(ft, base, 4, kind=kind)
    m = (ft - base) if kind == "linear" else (ft - base).T  # PEFT's update matrix
    assert b.shape == (m.shape[0], 4) and a.shape == (4, m.shape[1])
    u, s, vh = torch.linalg.svd(m.double())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose((b @ a).double(), best, atol=1e-5)
    assert torch.allclose(b.double().norm(dim=0), s[:4].sqrt(), atol=1e-5)  # B = U S^1/2


def test_lora_factors_reject_a_rank_too_large_and_mismatched_shapes():
    from brickwork.compress import lora_factors
    from brickwork.errors import RecipeError

    w = torch.zeros(3, 5)
    with pytest.raises(RecipeError, match=r"rank 4 is outside 1\.\.3 for a 3x5 weight"):
        lora_factors(w, w, 4)
    with pytest.raises(RecipeError, match="same 2-D shape"):
        lora_factors(w, torch.zeros(5, 3), 2)
