"""Llama -> Mixtral upcycling: identical experts reproduce the dense logits in transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _helpers import TINY_LM
from safetensors.torch import load_file

from brickwork.errors import BrickworkError, IncompatibleModelsError, OutputExistsError
from brickwork.route.upcycle import upcycle_to_mixtral

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed: int, **overrides):
    torch.manual_seed(seed)
    kwargs = {**TINY_LM, **overrides}
    cfg = transformers.LlamaConfig(**kwargs)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    base = _tiny_llama(0)
    base.save_pretrained(root / "base")
    for i in range(3):
        shutil.copytree(root / "base", root / f"copy{i}")
    for i in range(3):  # fine-tunes: the base plus a different small delta each
        ft = _tiny_llama(0)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        ft.save_pretrained(root / f"ft{i}")
    _tiny_llama(1, intermediate_size=48).save_pretrained(root / "narrow")
    return root, base


def _load_mixtral(out):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[k], (k, info[k])
    return model.eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_identical_experts_reproduce_dense_llama_logits(models, tmp_path, seed):
    root, base = models
    out = upcycle_to_mixtral(
        root / "base", [root / f"copy{i}" for i in range(3)], tmp_path / "moe", seed=seed,
        router_std=1.0,
    )  # fmt: skip
    moe = _load_mixtral(out)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_local_experts"] == 3 and cfg["num_experts_per_tok"] == 2
    assert json.loads((out / "brickwork.json").read_text())["kind"] == "route.upcycle"


def test_different_finetunes_become_experts_and_attention_is_merged(models, tmp_path):
    root, _ = models
    fts = [root / f"ft{i}" for i in range(3)]
    out = upcycle_to_mixtral(root / "base", fts, tmp_path / "moe", merge_method="linear")
    sd = load_file(out / "model.safetensors")
    srcs = [load_file(f / "model.safetensors") for f in fts]
    for e, src in enumerate(srcs):
        w1 = sd[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"]
        torch.testing.assert_close(w1, src["model.layers.1.mlp.gate_proj.weight"])
        w2 = sd[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"]
        torch.testing.assert_close(w2, src["model.layers.0.mlp.down_proj.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(sd[q], torch.stack([s[q] for s in srcs]).mean(0))
    assert sd["model.layers.0.block_sparse_moe.gate.weight"].shape == (3, 32)
    moe = _load_mixtral(out)
    with torch.no_grad():
        logits = moe(torch.arange(8)[None]).logits
    assert logits.shape == (1, 8, 128) and bool(torch.isfinite(logits).all())


def _nothing_written(tmp_path):
    assert not (tmp_path / "moe").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".moe")]


def test_non_llama_architecture_is_refused(models, tmp_path):
    root, _ = models
    qwen = tmp_path / "qwen"
    shutil.copytree(root / "base", qwen)
    cfg = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(IncompatibleModelsError, match="qwen2.*biases"):
        upcycle_to_mixtral(qwen, [qwen, qwen], tmp_path / "moe")
    _nothing_written(tmp_path)


def test_mismatched_shapes_are_listed(models, tmp_path):
    root, _ = models
    with pytest.raises(IncompatibleModelsError, match=r"expert1: config intermediate_size=48"):
        upcycle_to_mixtral(root / "base", [root / "copy0", root / "narrow"], tmp_path / "moe")
    _nothing_written(tmp_path)


def test_existing_output_and_bad_options_write_nothing(models, tmp_path):
    root, _ = models
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="already exists"):
        upcycle_to_mixtral(root / "base", [root / "copy0", root / "copy1"], tmp_path / "moe")
    assert [p.name for p in (tmp_path / "moe").iterdir()] == ["keep.txt"]
    shutil.rmtree(tmp_path / "moe")
    bad = [
        ({"top_k": 3}, "top_k must be in"),
        ({"merge_method": "tie"}, "Did you mean 'ties'"),
        ({"router_init": "tsk"}, "not implemented; known: cheap_embed, hidden"),
        ({"router_init": "hidden"}, "needs text"),
        (
            {"router_init": "hidden", "router_hidden": torch.ones(2, 3, 32)},
            "expected \\[2, 2, 32\\]",
        ),
    ]
    for kwargs, match in bad:
        with pytest.raises(BrickworkError, match=match):
            upcycle_to_mixtral(
                root / "base", [root / "copy0", root / "copy1"], tmp_path / "moe", **kwargs
            )
        _nothing_written(tmp_path)
    with pytest.raises(BrickworkError, match="no such file"):
        upcycle_to_mixtral(root / "base", [root / "copy0", root / "nope"], tmp_path / "moe")
    _nothing_written(tmp_path)


def test_hidden_router_init_writes_unit_rows(models, tmp_path):
    root, _ = models
    hidden = torch.randn(2, 3, 32)  # (layers, experts, hidden)
    out = upcycle_to_mixtral(
        root / "base", [root / f"copy{i}" for i in range(3)], tmp_path / "moe",
        router_init="hidden", router_hidden=hidden,
    )  # fmt: skip
    sd = load_file(out / "model.safetensors")
    for layer in range(2):
        gate = sd[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        torch.testing.assert_close(gate, hidden[layer] / hidden[layer].norm(dim=-1, keepdim=True))
