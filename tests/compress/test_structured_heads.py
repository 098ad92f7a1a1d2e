"""Attention heads removed from BERT and GPT-2 (brickwork.compress.structured_heads)."""

from __future__ import annotations

import json

import pytest
import torch

from brickwork.compress.structured import load_structured, prune_structured
from brickwork.errors import CheckpointError, RecipeError

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
HIDDEN, HEADS, LAYERS = 32, 4, 2
D = HIDDEN // HEADS  # head size, 8


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=64,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     max_position_embeddings=64)  # fmt: skip
    return BertModel(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_positions=32, n_embd=HIDDEN, n_layer=LAYERS,
                     n_head=HEADS, n_inner=48, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


BUILD = {"bert": _bert, "gpt2": _gpt2}


def _out(model, ids=IDS):
    with torch.no_grad():
        o = model(ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _attn(model, kind, i):
    """(q, k, v, o) weights of layer i as (out, in) matrices; GPT-2's fused c_attn split."""
    if kind == "bert":
        a = model.encoder.layer[i].attention
        s = a.self
        return s.query.weight, s.key.weight, s.value.weight, a.output.dense.weight
    a = model.transformer.h[i].attn  # Conv1D: (in, out) weights; c_attn columns [Q | K | V]
    qkv = a.c_attn.weight.T  # (3 * width, hidden)
    w = qkv.shape[0] // 3
    return qkv[:w], qkv[w : 2 * w], qkv[2 * w :], a.c_proj.weight.T  # o: (hidden, width)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    out = {}
    for name, build in BUILD.items():
        build().save_pretrained(root / name)
        out[name] = root / name
    return out


def _hf(d):
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if "bert" in d.name else AutoModelForCausalLM
    return auto.from_pretrained(str(d)).eval()


# -- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_pruning_no_heads_reproduces_the_model(dirs, tmp_path, kind):
    model = BUILD[kind]()
    res = prune_structured(model, heads=1.0)
    assert torch.equal(_out(res.model), _out(model))
    prune_structured(dirs[kind], tmp_path / "o", heads=1.0)
    assert torch.equal(_out(load_structured(tmp_path / "o")), _out(_hf(dirs[kind])))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("importance", ["magnitude", "wanda"])
def test_removing_heads_with_zero_output_columns_is_exact(kind, importance):
    model = BUILD[kind]()
    gen = torch.Generator().manual_seed(7)
    alive = {}
    with torch.no_grad():
        for i in range(LAYERS):
            dead = torch.randperm(HEADS, generator=gen)[:2].tolist()
            o = _attn(model, kind, i)[3]  # (hidden, heads * D), a view of the weight
            for h in dead:
                o[:, h * D : (h + 1) * D] = 0.0  # the head adds nothing to the stream
            alive[i] = {"heads": sorted(set(range(HEADS)) - set(dead))}
    ref = _out(model)
    data = [{"input_ids": IDS}] if importance == "wanda" else None
    res = prune_structured(model, heads=0.5, importance=importance, data=data)
    assert res.kept == alive
    assert (_out(res.model) - ref).abs().max() < 1e-5
    q, k, v, o = _attn(res.model, kind, 0)
    assert q.shape == k.shape == v.shape == (2 * D, HIDDEN) and o.shape == (HIDDEN, 2 * D)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@torch.no_grad()
def test_kept_heads_are_the_top_magnitude_ones(kind):
    model = BUILD[kind]()
    res = prune_structured(model, heads=0.5)
    for i in range(LAYERS):
        q, k, v, o = _attn(model, kind, i)
        score = [
            (
                q[h * D : (h + 1) * D].pow(2).sum()
                + k[h * D : (h + 1) * D].pow(2).sum()
                + v[h * D : (h + 1) * D].pow(2).sum()
            ).sqrt()
            * o[:, h * D : (h + 1) * D].pow(2).sum().sqrt()
            for h in range(HEADS)
        ]  # fmt: skip   ‖Q_h, K_h, V_h rows‖ · ‖O columns of h‖
        assert res.kept[i]["heads"] == sorted(torch.stack(score).topk(2).indices.tolist())


# -- directory in, brickwork format out ------------------------------------------------------


def _removed_per_head(kind):
    return 3 * D * HIDDEN + 3 * D + D * HIDDEN  # Q, K, V rows + biases, O input columns


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_saved_directory_loads_smaller_and_matches_in_memory(dirs, tmp_path, kind):
    from transformers import AutoModel

    src = dirs[kind]
    orig = _hf(src)
    res = prune_structured(src, tmp_path / "o", heads=0.5)
    mem = prune_structured(orig, heads=0.5)
    assert res.kept == mem.kept
    small = load_structured(tmp_path / "o")
    assert type(small) is type(orig)
    assert torch.equal(_out(small), _out(mem.model))
    import brickwork

    assert torch.equal(_out(brickwork.load(tmp_path / "o")), _out(mem.model))  # one loader
    # parameters: exactly the removed heads' tensors
    n_orig = sum(p.numel() for p in orig.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    assert n_orig - n_small == LAYERS * (HEADS // 2) * _removed_per_head(kind)
    assert res.parameters[0] - res.parameters[1] == n_orig - n_small
    q, k, v, o = _attn(small, kind, 1)
    assert q.shape == v.shape == (2 * D, HIDDEN) and o.shape == (HIDDEN, 2 * D)
    # the directory: brickwork format, the config it is rebuilt from keeps the head count
    d = tmp_path / "o"
    assert not (d / "config.json").exists()
    base = json.loads((d / "base_config.json").read_text())
    assert base[{"bert": "num_attention_heads", "gpt2": "n_head"}[kind]] == HEADS
    rec = json.loads((d / "brickwork.json").read_text())
    assert rec["format"] == "brickwork.heads" and rec["format_version"] == 1
    assert rec["heads"] == {"head_dim": D, "layers": {"0": 2, "1": 2}}
    assert rec["base"]["class"] == type(orig).__name__
    assert "load_structured" in (d / "README.md").read_text()
    with pytest.raises((OSError, ValueError)):  # transformers refuses it (no config.json)
        AutoModel.from_pretrained(str(d))


def test_bert_ffn_and_heads_together(dirs, tmp_path):
    src = dirs["bert"]
    orig = _hf(src)
    res = prune_structured(src, tmp_path / "o", ffn_ratio=0.5, heads=0.25)
    small = load_structured(tmp_path / "o")
    assert json.loads((tmp_path / "o" / "base_config.json").read_text())["intermediate_size"] == 32
    assert small.encoder.layer[0].intermediate.dense.weight.shape == (32, HIDDEN)
    assert small.encoder.layer[0].attention.self.query.weight.shape == (D, HIDDEN)
    per_ffn_unit = 2 * HIDDEN + 1
    removed = LAYERS * (3 * _removed_per_head("bert") + 32 * per_ffn_unit)
    assert sum(p.numel() for p in orig.parameters()) - removed == sum(
        p.numel() for p in small.parameters()
    )
    assert torch.equal(_out(small), _out(prune_structured(orig, ffn_ratio=0.5, heads=0.25).model))
    assert res.kept == prune_structured(orig, ffn_ratio=0.5, heads=0.25).kept


def test_transformers_has_no_pruned_heads():
    """The reason for brickwork's format (structured_heads docstring); if transformers brings
    ``pruned_heads`` back, a plain Hugging Face directory becomes possible again."""
    from transformers import BertConfig, GPT2Config, PreTrainedModel

    assert not hasattr(PreTrainedModel, "prune_heads")
    assert "pruned_heads" not in BertConfig().to_dict()
    assert "pruned_heads" not in GPT2Config().to_dict()
    assert "head_dim" not in BertConfig().to_dict() and "head_dim" not in GPT2Config().to_dict()


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize(
    "heads,match",
    [(0.0, r"must be in \(0, 1\]"), (1.5, r"must be in \(0, 1\]"), (0.1, "removing all")],
)
def test_bad_ratio(dirs, tmp_path, kind, heads, match):
    with pytest.raises(RecipeError, match=match):
        prune_structured(BUILD[kind](), heads=heads)
    with pytest.raises(RecipeError, match=match):
        prune_structured(dirs[kind], tmp_path / "o", heads=heads)
    assert not (tmp_path / "o").exists()


def test_load_structured_errors(dirs, tmp_path):
    with pytest.raises(CheckpointError, match="AutoModel"):  # a plain HF directory
        load_structured(dirs["bert"])
    prune_structured(dirs["bert"], tmp_path / "o", heads=0.5)
    meta = tmp_path / "o" / "brickwork.json"
    rec = json.loads(meta.read_text())
    meta.write_text(json.dumps({**rec, "format_version": 9}))
    with pytest.raises(CheckpointError, match="format_version"):
        load_structured(tmp_path / "o")
    meta.write_text(json.dumps({**rec, "heads": {"head_dim": 8, "layers": {"0": 3, "1": 2}}}))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_structured(tmp_path / "o")


# -- command line ----------------------------------------------------------------------------


def test_cli_structured_heads_on_bert(run_cli, dirs, tmp_path):
    code, stdout, err = run_cli(
        "compress", "prune", dirs["bert"], tmp_path / "a", "--structured", "heads",
        "--ratio", "0.25",
    )  # fmt: skip
    assert code == 0, err
    assert "structured heads" in stdout
    small = load_structured(tmp_path / "a")
    for layer in small.encoder.layer:
        assert layer.attention.self.query.weight.shape == (D, HIDDEN)  # 1 of 4 heads
        assert layer.attention.output.dense.weight.shape == (HIDDEN, D)
    rec = json.loads((tmp_path / "a" / "brickwork.json").read_text())
    assert [len(rec["kept"][str(i)]["heads"]) for i in range(LAYERS)] == [1, 1]
    assert torch.isfinite(_out(small)).all()
