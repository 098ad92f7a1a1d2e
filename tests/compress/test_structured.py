"""Structured pruning of FFN units and attention heads (brickwork.compress.structured)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from brickwork.checkpoint.reader import open_checkpoint
from brickwork.compress.structured import prune_structured
from brickwork.errors import DataError, OutputExistsError, RecipeError

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


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
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=16, n_layer=2,
                                      n_head=2, n_inner=48)).eval()  # fmt: skip


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    return BertModel(cfg).eval()


BUILD = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


def _out(model, ids=IDS):
    with torch.no_grad():
        o = model(ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    out = {}
    for name, build in BUILD.items():
        build().save_pretrained(root / name)
        out[name] = root / name
    g = torch.Generator().manual_seed(5)
    save_file(
        {"input_ids": torch.randint(0, 128, (16, 12), generator=g)}, str(root / "ids.safetensors")
    )
    out["calib"] = root / "ids.safetensors"
    return out


def _load(d):
    from transformers import AutoModel, AutoModelForCausalLM

    cfg = json.loads((d / "config.json").read_text())
    auto = AutoModel if cfg["model_type"] == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(str(d)).eval()


def _ffn_names(model_type):
    return {
        "llama": ("mlp.down_proj", "intermediate_size"),
        "gpt2": ("mlp.c_proj", "n_inner"),
        "bert": ("output.dense", "intermediate_size"),
    }[model_type]


# -- directory in, directory out -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_ffn_prune_loads_smaller_and_counts_parameters(dirs, tmp_path, kind):
    src = dirs[kind]
    before = sorted(p.name for p in src.iterdir())
    digest = open_checkpoint(src).checksum()
    orig = _load(src)
    n_ffn = {"llama": 64, "gpt2": 48, "bert": 64}[kind]
    res = prune_structured(src, tmp_path / "o", ffn_ratio=0.25)
    small = _load(tmp_path / "o")
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg[_ffn_names(kind)[1]] == n_ffn // 4
    # every FFN unit removed costs its input rows (+ bias entries) and output column
    per_unit = {"llama": 3 * 32, "gpt2": 2 * 16 + 1, "bert": 2 * 32 + 1}[kind]
    n_orig = sum(p.numel() for p in orig.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small == n_orig - 2 * (n_ffn - n_ffn // 4) * per_unit
    assert res.parameters[0] - res.parameters[1] == n_orig - n_small
    rec = json.loads((tmp_path / "o" / "brickwork.json").read_text())
    assert [len(rec["kept"][str(i)]["ffn"]) for i in range(2)] == [n_ffn // 4] * 2
    assert rec["kept"] == {str(k): v for k, v in res.kept.items()}
    assert "Structurally pruned" in (tmp_path / "o" / "README.md").read_text()
    assert torch.isfinite(_out(small)).all()
    # inputs untouched
    assert sorted(p.name for p in src.iterdir()) == before
    assert open_checkpoint(src).checksum() == digest


def test_llama_gqa_heads_and_ffn_shrink_the_config(dirs, tmp_path):
    prune_structured(dirs["llama"], tmp_path / "o", ffn_ratio=0.5, heads=0.5)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 8)
    small = _load(tmp_path / "o")
    attn = small.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (16, 32) and attn.k_proj.weight.shape == (8, 32)
    assert attn.o_proj.weight.shape == (32, 16)
    assert small.model.layers[1].mlp.gate_proj.weight.shape == (32, 32)
    rec = json.loads((tmp_path / "o" / "brickwork.json").read_text())
    for i in range(2):  # whole KV groups: heads (0, 1) or (2, 3)
        assert rec["kept"][str(i)]["heads"] in ([0, 1], [2, 3])


@pytest.mark.parametrize("kind,kw", [("llama", {"ffn_ratio": 1.0, "heads": 1.0}),
                                     ("gpt2", {"ffn_ratio": 1.0}), ("bert", {"ffn_ratio": 1.0})])  # fmt: skip
def test_ratio_one_changes_nothing(dirs, tmp_path, kind, kw):
    prune_structured(dirs[kind], tmp_path / "o", **kw)
    assert torch.equal(_out(_load(tmp_path / "o")), _out(_load(dirs[kind])))


# -- exact property: units whose outgoing weights are zero ------------------------------------


def _zero_units(model, kind, gen):
    """Zero the outgoing weights of half the FFN units (and, for Llama, of one KV group's
    heads) in every layer; returns the units (heads) that stay."""
    from brickwork.arch.transformer import transformer_layout

    sd = model.state_dict()
    lay = transformer_layout(model.config, sd)
    alive = {}
    with torch.no_grad():
        for la in lay.layers:
            dead = torch.randperm(lay.ffn, generator=gen)[: lay.ffn // 2]
            sd[la.ffn_out.weight].index_fill_(la.ffn_out.in_axis, dead, 0.0)
            rec = {"ffn": sorted(set(range(lay.ffn)) - set(dead.tolist()))}
            if kind == "llama":
                g = int(torch.randint(2, (1,), generator=gen))  # the group that goes
                sd[la.o.weight][:, g * 16 : (g + 1) * 16] = 0.0
                rec["heads"] = [2, 3] if g == 0 else [0, 1]
            alive[la.index] = rec
    return alive


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("importance", ["magnitude", "wanda"])
def test_removing_units_with_zero_outgoing_weights_is_exact(kind, importance):
    model = BUILD[kind]()
    alive = _zero_units(model, kind, torch.Generator().manual_seed(7))
    heads = 0.5 if kind == "llama" else None
    ref = _out(model)
    sd = {n: t.clone() for n, t in model.state_dict().items()}
    data = [{"input_ids": IDS}] if importance == "wanda" else None
    res = prune_structured(model, ffn_ratio=0.5, heads=heads, importance=importance, data=data)
    assert res.kept == alive
    assert (_out(res.model) - ref).abs().max() < 1e-5
    # the input module is untouched
    assert all(torch.equal(t, sd[n]) for n, t in model.state_dict().items())


# -- the kept units are the top-importance ones ----------------------------------------------


@torch.no_grad()
def test_kept_units_are_the_top_magnitude_ones():
    model = _llama()
    res = prune_structured(model, ffn_ratio=0.25, heads=0.5)
    for i, layer in enumerate(model.model.layers):
        m = layer.mlp
        score = (
            m.gate_proj.weight.pow(2).sum(1) + m.up_proj.weight.pow(2).sum(1)
        ).sqrt() * m.down_proj.weight.pow(2).sum(0).sqrt()  # (ffn,): ‖input rows‖ · ‖output column‖
        assert res.kept[i]["ffn"] == sorted(score.topk(16).indices.tolist())
        a = layer.self_attn
        g_score = [
            (a.q_proj.weight[16 * g : 16 * (g + 1)].pow(2).sum()
             + a.k_proj.weight[8 * g : 8 * (g + 1)].pow(2).sum()
             + a.v_proj.weight[8 * g : 8 * (g + 1)].pow(2).sum()).sqrt()
            * a.o_proj.weight[:, 16 * g : 16 * (g + 1)].pow(2).sum().sqrt()
            for g in range(2)
        ]  # fmt: skip
        best = max(range(2), key=lambda g: float(g_score[g]))
        assert res.kept[i]["heads"] == [2 * best, 2 * best + 1]


def test_kept_units_are_the_top_wanda_ones():
    model = _gpt2()
    acts = {}

    def hook(mod, inp):
        acts.setdefault(id(mod), []).append(inp[0].reshape(-1, inp[0].shape[-1]))

    hs = [b.mlp.c_proj.register_forward_pre_hook(hook) for b in model.transformer.h]
    _out(model)
    for h in hs:
        h.remove()
    res = prune_structured(model, ffn_ratio=0.5, importance="wanda", data=[{"input_ids": IDS}])
    for i, b in enumerate(model.transformer.h):
        x = torch.cat(acts[id(b.mlp.c_proj)])  # (tokens, ffn)
        w = b.mlp.c_proj.weight  # Conv1D: (ffn, hidden)
        score = x.pow(2).sum(0).sqrt() * w.pow(2).sum(1).sqrt()  # ‖X_j‖ · ‖W_out[:, j]‖
        assert res.kept[i]["ffn"] == sorted(score.topk(24).indices.tolist())


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,err,match",
    [
        ({"ffn_ratio": 0.0}, RecipeError, r"must be in \(0, 1\]"),
        ({"ffn_ratio": 1.5}, RecipeError, r"must be in \(0, 1\]"),
        ({"heads": 0.1}, RecipeError, "removing all"),
        ({"heads": 0.25}, RecipeError, "multiple of 2"),
        ({}, RecipeError, "needs ffn_ratio"),
        ({"ffn_ratio": 0.5, "importance": "wanda"}, DataError, "calibration data"),
        ({"ffn_ratio": 0.5, "importance": "taylor"}, RecipeError, "Known"),
    ],
)
def test_errors(kw, err, match):
    with pytest.raises(err, match=match):
        prune_structured(_llama(), **kw)


def test_output_exists(dirs, tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        prune_structured(dirs["llama"], tmp_path / "o", ffn_ratio=0.5)


# -- command line ----------------------------------------------------------------------------


def test_cli_structured(run_cli, dirs, tmp_path):
    src = dirs["llama"]
    code, stdout, err = run_cli(
        "compress", "prune", src, tmp_path / "a", "--structured", "ffn+heads", "--ratio", "0.5"
    )
    assert code == 0, err
    assert "structured ffn+heads" in stdout
    assert _load(tmp_path / "a").config.num_key_value_heads == 1
    code, stdout, err = run_cli(
        "compress", "prune", dirs["gpt2"], tmp_path / "b", "--structured", "ffn",
        "--ratio", "0.5", "--method", "wanda", "--data", dirs["calib"],
    )  # fmt: skip
    assert code == 0, err
    rec = json.loads((tmp_path / "b" / "brickwork.json").read_text())
    assert rec["importance"] == "wanda" and rec["calibration"]["files"][0]["sha256"]
    assert _load(tmp_path / "b").config.n_inner == 24
    for args, match in [
        (["--structured", "ffn"], "needs --ratio"),
        (["--structured", "ffn", "--ratio", "0.5", "--sparsity", "0.5"], "one or the other"),
        (["--structured", "mlp", "--ratio", "0.5"], "Known"),
        (["--structured", "ffn", "--ratio", "0.5", "--method", "sparsegpt"], "magnitude or"),
        (["--ratio", "0.5"], "--structured"),
    ]:
        code, stdout, err = run_cli("compress", "prune", src, tmp_path / "c", *args)
        assert code != 0 and match in (stdout + err), (args, stdout + err)
        assert not (tmp_path / "c").exists()


def test_head_dim_is_written_when_the_source_config_derives_it(dirs, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(dirs["llama"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("head_dim", None)  # Llama then derives head_dim = hidden / heads = 8
    (src / "config.json").write_text(json.dumps(cfg))
    prune_structured(src, tmp_path / "o", heads=0.5)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["head_dim"] == 8
    small = _load(tmp_path / "o")
    assert small.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)


# -- generic modules through the permutation spec ---------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 12), torch.nn.LayerNorm(12),
        torch.nn.GELU(), torch.nn.Linear(12, 3),
    ).eval()  # fmt: skip


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 5),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("build,x", [(_mlp, torch.randn(5, 8)), (_cnn, torch.randn(2, 3, 4, 4))])
def test_generic_module_zero_outgoing_units_are_removed_exactly(build, x):
    from brickwork.align.spec import permutation_spec

    model = build()
    with torch.no_grad():
        for m in model.modules():  # non-trivial BatchNorm statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    spec = permutation_spec(model)
    gen = torch.Generator().manual_seed(2)
    alive = {}
    consumers = {g.name: g.consumers for g in spec.groups}
    with torch.no_grad():
        for g in spec.groups:
            owners = [model.get_submodule(m.tensor.rpartition(".")[0]) for m in g.members]
            if any(isinstance(o, torch.nn.LayerNorm) for o in owners):
                alive[g.name] = list(range(g.size))  # normalised together: kept whole
                continue
            dead = torch.randperm(g.size, generator=gen)[: g.size // 2]
            for c in consumers[g.name]:
                w = model.get_submodule(c).weight  # (out, in[, k, k])
                block = w.shape[1] // g.size
                cols = (dead.view(-1, 1) * block + torch.arange(block)).reshape(-1)
                w.index_fill_(1, cols, 0.0)
            alive[g.name] = sorted(set(range(g.size)) - set(dead.tolist()))
    ref = model(x)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    res = prune_structured(model, ffn_ratio=0.5)
    assert res.kept == alive
    out = res.model(x)
    assert (out - ref).abs().max() < 1e-5
    assert res.parameters[1] == sum(p.numel() for p in res.model.state_dict().values())
    assert res.parameters[1] < res.parameters[0]
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_generic_module_keeps_top_magnitude_and_refuses_heads():
    model = _mlp()
    res = prune_structured(model, ffn_ratio=0.25)
    w0, w1 = model[0].weight, model[2].weight
    score = w0.pow(2).sum(1).sqrt() * w1.pow(2).sum(0).sqrt()  # (16,)
    assert res.kept["0"] == sorted(score.topk(4).indices.tolist())
    assert res.model[0].weight.shape == (4, 8) and res.model[2].weight.shape == (12, 4)
    assert res.kept["2"] == list(range(12))  # under a LayerNorm: kept whole
    assert res.model[5].in_features == 12
    with pytest.raises(RecipeError, match="no Hugging Face config"):
        prune_structured(model, heads=0.5)
