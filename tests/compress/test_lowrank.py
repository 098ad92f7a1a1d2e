"""Low-rank factorisation (svd, asvd, svd_llm), its file format and CLI, and Tucker / CP convs."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from torch import nn

import brickwork
from brickwork.compress import factorize_conv, factorize_model, factorize_weight
from brickwork.compress.lowrank import (
    METHODS,
    LowRankLinear,
    _linear_shape,
    gram_statistics,
    rank_for_ratio,
    select_layers,
)
from brickwork.errors import DataError, OutputExistsError, RecipeError

torch.set_num_threads(1)

CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song at dawn",
    "my cat and your dog are friends",
    "rain fell on the quiet town",
    "the sun rose over the hills",
    "children played in the park all day",
    "a song of rain and sun",
] * 4


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRICKWORK_CACHE", str(tmp_path / "cache"))


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return BertModel(cfg).eval()


MODELS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


def _out(model, ids):
    o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") and o.logits is not None else o.last_hidden_state


def _batches(vocab: int, n: int = 4, seq: int = 24):
    return [
        {"input_ids": torch.randint(0, vocab, (4, seq), generator=_g(10 + i))} for i in range(n)
    ]


def _full_ranks(model):
    return {p: min(_linear_shape(m)) for p, m in select_layers(model).items()}


@pytest.fixture(scope="module")
def models():
    return {k: f() for k, f in MODELS.items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", list(MODELS))
def test_full_rank_reproduces_the_model(models, arch, method):
    model = models[arch]
    vocab = model.config.vocab_size
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grams = gram_statistics(model, _batches(vocab)) if method != "svd" else None
    new, reports = factorize_model(model, method=method, rank=_full_ranks(model), grams=grams)
    n_low = sum(isinstance(m, LowRankLinear) for m in new.modules())
    assert n_low == len(reports) == len(select_layers(model)) > 0
    ids = torch.randint(0, vocab, (2, 12), generator=_g(1))
    with torch.no_grad():
        torch.testing.assert_close(_out(new, ids), _out(model, ids), atol=1e-4, rtol=0)
    # the input model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_default_layers_are_the_transformer_layers(models):
    names = set(select_layers(models["llama"]))
    assert "lm_head" not in names and len(names) == 2 * 7  # q k v o gate up down per layer
    assert set(select_layers(models["gpt2"])) == {
        f"transformer.h.{i}.{p}" for i in range(2)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }  # fmt: skip
    only = select_layers(models["llama"], include=["*.mlp.*"], exclude=["*down_proj"])
    assert sorted(only) == [
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")
    ]
    with pytest.raises(RecipeError, match="matches no linear layer"):
        select_layers(models["llama"], include=["*.mlpp.*"])
    with pytest.raises(RecipeError, match="'lm_head'.* tied to 'transformer.wte.weight'"):
        select_layers(models["gpt2"], include=["lm_head"])


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.8, 1.0])
def test_ratio_sets_each_layers_rank_and_the_parameter_count(models, ratio):
    model = models["llama"]
    new, reports = factorize_model(model, method="svd", ratio=ratio)
    budget = kept = 0
    for r in reports:
        m, n = r.shape
        if r.rank is None:  # dense: factorising at that ratio would not save parameters
            assert rank_for_ratio(m, n, ratio) * (m + n) >= m * n
            continue
        # the largest rank whose factors fit in ratio · m n: within one rank step per layer
        assert r.rank * (m + n) <= ratio * m * n < (r.rank + 1) * (m + n)
        mod = new.get_submodule(r.path)
        assert mod.first.weight.shape == (r.rank, n) and mod.second.weight.shape == (m, r.rank)
        budget += ratio * m * n
        kept += r.rank * (m + n)
        assert r.params_after == sum(p.numel() for p in mod.parameters())
    n_fact = sum(r.rank is not None for r in reports)
    if ratio < 1:
        assert n_fact == len(reports)
    assert budget - n_fact * max(sum(r.shape) for r in reports) <= kept <= budget
    total = sum(p.numel() for p in new.parameters())
    assert total == sum(p.numel() for p in model.parameters()) - sum(
        r.params_before - r.params_after for r in reports
    )


def test_svd_is_the_eckart_young_optimum():
    w = torch.randn(24, 40, generator=_g(0))
    s = torch.linalg.svdvals(w.double())
    b, a, _ = factorize_weight(w, 7, method="svd")
    err = torch.linalg.matrix_norm((w - b @ a).double())
    assert math.isclose(float(err**2), float((s[7:] ** 2).sum()), rel_tol=1e-5)
    # any other rank-7 approximation (e.g. ASVD's) is no closer in Frobenius norm
    gram = torch.diag(torch.rand(40, generator=_g(1)) * 10 + 0.1)
    b2, a2, _ = factorize_weight(w, 7, method="asvd", gram=gram, rows=1)
    assert torch.linalg.matrix_norm((w - b2 @ a2).double()) >= err - 1e-6


def test_asvd_and_svd_llm_follow_the_papers_formulas():
    w = torch.randn(12, 20, generator=_g(2), dtype=torch.float64)
    x = torch.randn(50, 20, generator=_g(3), dtype=torch.float64) * torch.linspace(0.1, 3, 20)
    gram, rows, r = x.T @ x, 50, 5
    # ASVD: S = diag(RMS_j)^α, W ≈ U_r Σ_r V_rᵀ S⁻¹
    alpha = 0.5
    smat = torch.diag(((x**2).mean(0).sqrt()) ** alpha)
    u, sig, vh = torch.linalg.svd(w @ smat)
    expect = u[:, :r] @ torch.diag(sig[:r]) @ vh[:r] @ torch.linalg.inv(smat)
    b, a, _ = factorize_weight(w, r, method="asvd", gram=gram, rows=rows, alpha=alpha)
    torch.testing.assert_close(b @ a, expect)
    # SVD-LLM: L = chol(XᵀX / rows), W ≈ U_r Σ_r V_rᵀ L⁻¹
    chol = torch.linalg.cholesky(gram / rows)
    u, sig, vh = torch.linalg.svd(w @ chol)
    expect = u[:, :r] @ torch.diag(sig[:r]) @ vh[:r] @ torch.linalg.inv(chol)
    b, a, ridge = factorize_weight(w, r, method="svd_llm", gram=gram, rows=rows)
    torch.testing.assert_close(b @ a, expect)
    assert ridge == 0.0


def test_svd_llm_output_error_is_at_most_plain_svds(models):
    model = models["llama"]
    batches = _batches(model.config.vocab_size, n=6)  # 576 rows > 64 inputs: XᵀX definite
    grams = gram_statistics(model, batches)
    rank = {p: 4 for p in select_layers(model)}
    plain, _ = factorize_model(model, method="svd", rank=rank)
    llm, reports = factorize_model(model, method="svd_llm", rank=rank, grams=grams)
    asvd, _ = factorize_model(model, method="asvd", rank=rank, grams=grams)
    assert all(r.ridge == 0.0 for r in reports)

    def out_err(m, path):  # ‖(W − Ŵ) X‖_F² = tr(Δ G Δᵀ) on the calibration inputs of the layer
        low = m.get_submodule(path)
        w = model.get_submodule(path).weight.detach().double()
        d = w - (low.second.weight @ low.first.weight).detach().double()
        return float(torch.trace(d @ grams[path][0].double() @ d.T))

    strictly = 0
    for path in rank:
        e_svd, e_llm = out_err(plain, path), out_err(llm, path)
        assert e_llm <= e_svd * (1 + 1e-6), path
        strictly += e_llm < 0.99 * e_svd
    assert strictly > len(rank) // 2  # not only equal: whitening helps on most layers
    # and on the model's outputs on the same data
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        errs = {k: float((m(input_ids=ids).logits - ref).norm()) for k, m in
                (("svd", plain), ("svd_llm", llm), ("asvd", asvd))}  # fmt: skip
    assert errs["svd_llm"] < errs["svd"], errs


def test_svd_llm_regularises_a_singular_gram():
    w = torch.randn(8, 16, generator=_g(4))
    x = torch.randn(5, 16, generator=_g(5))  # 5 rows, 16 inputs: XᵀX has rank 5
    b, a, ridge = factorize_weight(w, 16 // 2, method="svd_llm", gram=x.T @ x, rows=5)
    assert ridge > 0 and torch.isfinite(b @ a).all()
    b, a, _ = factorize_weight(w, 8, method="svd_llm", gram=x.T @ x, rows=5)
    torch.testing.assert_close(b @ a, w, atol=1e-4, rtol=0)  # full rank: still exact


def test_bad_options(models):
    model = models["llama"]
    with pytest.raises(
        RecipeError, match=r"rank 20 is larger .*k_proj.*32×16|rank 20 is larger .*16×32"
    ):
        factorize_model(model, method="svd", rank=20)
    for bad in (0, -0.5, 1.5):
        with pytest.raises(RecipeError, match=r"ratio must be in \(0, 1\]"):
            factorize_model(model, method="svd", ratio=bad)
    with pytest.raises(RecipeError, match="exactly one"):
        factorize_model(model, method="svd", ratio=0.5, rank=4)
    with pytest.raises(DataError, match="needs calibration data"):
        factorize_model(model, method="svd_llm", ratio=0.5)
    with pytest.raises(RecipeError, match="Did you mean 'svd_llm'"):
        factorize_model(model, method="svd-llm", ratio=0.5)


# -- saved format and CLI --------------------------------------------------------------------
def _tree_digest(d):
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 with an offline word-level tokenizer, and a calibration text file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("gpt2lr")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    _gpt2().save_pretrained(root / "m")
    fast.save_pretrained(root / "m")
    (root / "calib.txt").write_text("\n".join(CORPUS) + "\n")
    return root / "m", root / "calib.txt"


def test_cli_svd_ratio_writes_a_model_that_brickwork_loads(run_cli, tmp_path, llama_family):
    from transformers import LlamaForCausalLM

    src = llama_family.base
    digest = _tree_digest(src)
    code, out, err = run_cli("compress", "lowrank", src, tmp_path / "o", "--method", "svd",
                             "--ratio", "0.5")  # fmt: skip
    assert code == 0, out + err
    assert "14 of 14 layers factorised" in out
    o = tmp_path / "o"
    assert not (o / "config.json").exists()  # transformers must not load it as dense
    assert (o / "tokenizer_config.json").is_file()  # side files carried over
    loaded = brickwork.load(o)
    dense = LlamaForCausalLM.from_pretrained(src).eval()
    mem, _ = factorize_model(dense, method="svd", ratio=0.5)
    ids = torch.randint(0, 128, (2, 10), generator=_g(7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, mem(input_ids=ids).logits)
    meta = json.loads((o / "brickwork.json").read_text())
    assert meta["format"] == "brickwork.lowrank" and meta["method"] == "svd"
    p = meta["parameters"]
    assert p["params_after"] <= 0.5 * p["params_before"]
    assert p["model_after"] == sum(t.numel() for t in loaded.parameters())
    assert p["model_before"] - p["model_after"] == p["params_before"] - p["params_after"]
    assert {e["path"]: e["rank"] for e in meta["lowrank"]} == {
        r["path"]: r["rank"] for r in p["layers"]
    }
    assert meta["inputs"]["model"]["checksum"] and "brickwork" in meta["environment"]
    assert "Low-rank" in (o / "README.md").read_text()
    assert _tree_digest(src) == digest  # input untouched


@pytest.mark.parametrize("method", ["asvd", "svd_llm"])
def test_cli_data_methods_on_gpt2(run_cli, tmp_path, gpt2_dir, method):
    src, text = gpt2_dir
    code, out, err = run_cli("compress", "lowrank", src, tmp_path / "o", "--method", method,
                             "--rank", "4", "--data", text, "--max-length", "12", "-q")  # fmt: skip
    assert code == 0, out + err
    meta = json.loads((tmp_path / "o" / "brickwork.json").read_text())
    assert meta["inputs"]["data"][0]["path"] == str(text)
    assert meta["inputs"]["data"][0]["n_examples"] == 256
    assert all(e["rank"] == 4 for e in meta["lowrank"]) and len(meta["lowrank"]) == 8
    loaded = brickwork.load(tmp_path / "o")
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == 8
    ids = torch.randint(2, 40, (1, 8), generator=_g(0))
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=ids).logits).all()


def test_cli_errors_write_nothing(run_cli, tmp_path, llama_family):
    src = llama_family.base
    o = tmp_path / "o"
    cases = [
        (["--method", "svd", "--rank", "40"], "rank 40 is larger"),
        (["--method", "svd", "--ratio", "1.5"], "ratio must be in (0, 1]"),
        (["--method", "svd", "--ratio", "0"], "ratio must be in (0, 1]"),
        (["--method", "asvd", "--ratio", "0.5"], "needs calibration data"),
        (["--method", "svd_llm", "--ratio", "0.5"], "--data FILE"),
        (["--method", "svdd", "--ratio", "0.5"], "Did you mean 'svd'"),
        (["--method", "svd"], "exactly one of --ratio"),
    ]
    for args, msg in cases:
        code, out, err = run_cli("compress", "lowrank", src, o, *args)
        assert code != 0 and msg in err, (args, out, err)
        assert not o.exists()
    code, _, err = run_cli("compress", "lowrank", src, src / "sub", "--ratio", "0.5")
    assert code != 0 and "overlaps" in err and not (src / "sub").exists()
    o.mkdir()
    code, _, err = run_cli("compress", "lowrank", src, o, "--ratio", "0.5")
    assert code != 0 and "exists" in err and list(o.iterdir()) == []


def test_save_and_load_in_memory_bert(tmp_path, models):
    from brickwork.compress import save_lowrank

    model = models["bert"]
    new, _ = factorize_model(model, method="svd", ratio=0.7, include=["*.attention.*"])
    save_lowrank(new, tmp_path / "b")
    loaded = brickwork.load(tmp_path / "b")
    ids = torch.randint(0, 128, (2, 9), generator=_g(3))
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, ids), _out(new, ids))
    with pytest.raises(OutputExistsError):
        save_lowrank(new, tmp_path / "b")


# -- Tucker / CP convs -----------------------------------------------------------------------
def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(6, 5, (3, 2), padding=(1, 0))
    ).eval()


def test_tucker_full_rank_reproduces_the_convs_and_low_rank_is_smaller():
    net = _convnet()
    x = torch.randn(2, 3, 9, 9, generator=_g(0))
    full = factorize_conv(net, method="tucker", rank="full")
    assert [len(full[i]) for i in (0, 2)] == [3, 3]
    with torch.no_grad():
        torch.testing.assert_close(full(x), net(x), atol=1e-5, rtol=0)
    small = factorize_conv(net, method="tucker", rank=2)
    assert small[0][1].weight.shape == (2, 2, 3, 3)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
    assert isinstance(net[0], nn.Conv2d)  # input untouched


def test_cp_sequence_computes_its_kernel_and_recovers_a_low_rank_kernel():
    import torch.nn.functional as F

    conv = nn.Conv2d(4, 5, 3, padding=1, bias=True)
    r = 3
    with torch.no_grad():  # an exact CP-rank-3 kernel
        fac = [torch.randn(s, r, generator=_g(i)) for i, s in enumerate((5, 4, 3, 3))]
        conv.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", *fac))
    net = nn.Sequential(conv)
    cp = factorize_conv(net, method="cp", rank=r)
    first, vert, horiz, last = cp[0]
    # the 4-conv form is exactly the conv with the CP reconstruction as kernel
    kernel = torch.einsum(
        "or,ri,rh,rw->oihw", last.weight[:, :, 0, 0], first.weight[:, :, 0, 0],
        vert.weight[:, 0, :, 0], horiz.weight[:, 0, 0, :],
    )  # fmt: skip
    x = torch.randn(2, 4, 7, 7, generator=_g(9))
    with torch.no_grad():
        torch.testing.assert_close(
            cp(x), F.conv2d(x, kernel, conv.bias, padding=1), atol=1e-5, rtol=0
        )
        # ALS at the true rank finds the kernel
        torch.testing.assert_close(cp(x), net(x), atol=1e-3, rtol=1e-3)
    with pytest.raises(RecipeError, match="not a Conv2d"):
        factorize_conv(net, method="cp", rank=2, include=["1"])


def test_cli_filters_and_force(run_cli, tmp_path, llama_family):
    o = tmp_path / "o"
    args = ["compress", "lowrank", llama_family.base, o, "--rank", "8", "-q"]
    code, out, err = run_cli(*args, "--include", "*.mlp.*", "--exclude", "*down_proj")
    assert code == 0, out + err
    meta = json.loads((o / "brickwork.json").read_text())
    assert sorted(e["path"] for e in meta["lowrank"]) == [
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")
    ]
    code, out, err = run_cli(*args, "--force")  # default layers now, replacing the output
    assert code == 0, out + err
    meta = json.loads((o / "brickwork.json").read_text())
    assert len(meta["lowrank"]) == 14 and meta["settings"]["rank"] == 8
