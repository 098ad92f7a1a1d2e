"""Upcycling BERT encoders and generic modules into brickwork's MoE format."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import brickwork
from brickwork.errors import BrickworkError, IncompatibleModelsError, RecipeError
from brickwork.route.moe import MoEBlock
from brickwork.route.upcycle_modules import upcycle_hf_models, upcycle_module

transformers = pytest.importorskip("transformers")


def _bert(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64)  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _perturbed(model, seed, scale=0.3):
    out = type(model)(model.config).eval()
    out.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def test_identical_bert_experts_reproduce_dense_and_round_trip(tmp_path):
    base = _bert(0)
    base.save_pretrained(tmp_path / "base")
    out = upcycle_hf_models(tmp_path / "base", [tmp_path / "base"] * 3, tmp_path / "moe",
                            top_k=2, router_std=1.0, seed=1)  # fmt: skip
    meta = json.loads((out / "brickwork.json").read_text())
    assert meta["format"] == "brickwork.moe" and meta["kind"] == "route.upcycle"
    assert [m["path"] for m in meta["moe"]] == [
        "encoder.layer.0.intermediate",
        "encoder.layer.1.intermediate",
    ]
    loaded = brickwork.load(out)
    blocks = [m for m in loaded.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == 2 and blocks[0].moe.n_experts == 3
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base(ids).last_hidden_state
        torch.testing.assert_close(loaded(ids).last_hidden_state, want, atol=1e-5, rtol=1e-5)


def test_bert_experts_keep_their_ffns_and_merge_the_rest(tmp_path):
    base = _bert(0)
    fts = [_perturbed(base, 1), _perturbed(base, 2)]
    new = upcycle_module(base, fts, merge_method="linear", top_k=1)
    moe = new.encoder.layer[1].intermediate.moe
    for e, ft in enumerate(fts):
        torch.testing.assert_close(moe.gate_up[e], ft.encoder.layer[1].intermediate.dense.weight)
        torch.testing.assert_close(moe.b_in[e], ft.encoder.layer[1].intermediate.dense.bias)
        torch.testing.assert_close(moe.down[e], ft.encoder.layer[1].output.dense.weight)
        torch.testing.assert_close(moe.b_out[e], ft.encoder.layer[1].output.dense.bias)
    assert isinstance(new.encoder.layer[1].output.dense, nn.Identity)
    q = new.encoder.layer[0].attention.self.query.weight
    torch.testing.assert_close(q, (fts[0].encoder.layer[0].attention.self.query.weight
                                   + fts[1].encoder.layer[0].attention.self.query.weight) / 2)  # fmt: skip
    # inputs untouched
    assert isinstance(base.encoder.layer[1].intermediate.dense, nn.Linear)


def test_generic_module_task_router_routes_each_domain_to_its_expert():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 16), nn.GELU(),
                                                        nn.Linear(16, 8)))  # fmt: skip
    fts = []
    for s in (1, 2):
        ft = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 16), nn.GELU(),
                                                          nn.Linear(16, 8)))  # fmt: skip
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            ft[1][0].weight.add_(torch.randn(16, 8, generator=torch.Generator().manual_seed(s)))
        fts.append(ft)
    g = torch.Generator().manual_seed(3)
    domains = [torch.randn(64, 8, generator=g) + 3.0, torch.randn(64, 8, generator=g) - 3.0]
    new = upcycle_module(base, fts, top_k=1, router_init="task",
                         examples=[[d[:32]] for d in domains])  # fmt: skip
    moe = new[1].moe
    with torch.no_grad():
        for e, d in enumerate(domains):
            top = moe.route(base[0](d[32:])).indices[:, 0]  # held-out inputs of domain e
            assert (top == e).float().mean() > 0.9
        x = domains[0][32:]
        y_dense = fts[0](x)  # all routed to expert 0 -> that fine-tune's FFN
        torch.testing.assert_close(new(x), y_dense, atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_clear_errors(tmp_path):
    base = _bert(0)
    other = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )  # fmt: skip
    )
    with pytest.raises(IncompatibleModelsError, match="expert1: 'encoder.layer.0.intermediate"):
        upcycle_module(base, [base, other])
    with pytest.raises(RecipeError, match=r"experts\[0\].examples"):
        upcycle_module(base, [base, base], router_init="task")
    with pytest.raises(RecipeError, match="known: random, task"):
        upcycle_module(base, [base, base], router_init="hidden")
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(BrickworkError, match="no config.json"):
        upcycle_hf_models(tmp_path / "base", [tmp_path / "base", tmp_path / "x"], tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    shutil.rmtree(tmp_path / "base")
