"""Qwen2-MoE exports: Qwen2 inputs (q/k/v biases), shared experts, Mistral; checked by the
logits of transformers' AutoModelForCausalLM against the dense models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _helpers import TINY_LM
from safetensors.torch import load_file

from brickwork.errors import BrickworkError, IncompatibleModelsError
from brickwork.route.upcycle import upcycle_moe, upcycle_to_mixtral

transformers = pytest.importorskip("transformers")

_KW = TINY_LM


def _save(model, path, *, half_ffn: bool = False):
    """Save ``model``; with ``half_ffn`` every FFN output is halved (down_proj * 0.5)."""
    if half_ffn:
        sd = {k: (v * 0.5 if k.endswith("mlp.down_proj.weight") else v) for k, v in
              model.state_dict().items()}  # fmt: skip
        model = type(model)(model.config)
        model.load_state_dict(sd)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Dense tiny models (eval) and their directories: llama, mistral, qwen2 (+ halves)."""
    root = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    models = {
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(**_KW)),
        "mistral": transformers.MistralForCausalLM(
            transformers.MistralConfig(**_KW, sliding_window=4096)
        ),
        "qwen2": transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_KW)),
    }
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them matter
        for n, p in models["qwen2"].named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.2)
    dirs = {}
    for k, m in models.items():
        m.eval()
        dirs[k] = _save(m, root / k)
        dirs[f"{k}_half"] = _save(m, root / f"{k}_half", half_ffn=True)
    return models, dirs


def _load(out, arch: str):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == arch
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[k], (k, info[k])
    return model.eval()


def _same_logits(moe, dense, seed=0):
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_qwen2_identical_experts_reproduce_dense_qwen2(dense, tmp_path, top_k):
    models, dirs = dense
    out = upcycle_moe(dirs["qwen2"], [dirs["qwen2"]] * 3, tmp_path / "moe", top_k=top_k,
                      router_std=1.0)  # fmt: skip
    _same_logits(_load(out, "Qwen2MoeForCausalLM"), models["qwen2"])
    sd = load_file(out / "model.safetensors")
    bias = "model.layers.1.self_attn.k_proj.bias"
    torch.testing.assert_close(sd[bias], models["qwen2"].state_dict()[bias])
    assert bool(sd[bias].abs().sum() > 0)
    # no shared expert asked: a width-1 all-zero one (Qwen2-MoE always has one)
    assert sd["model.layers.0.mlp.shared_expert.down_proj.weight"].shape == (32, 1)
    assert not sd["model.layers.0.mlp.shared_expert.up_proj.weight"].any()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == 3 and cfg["num_experts_per_tok"] == top_k
    assert json.loads((out / "brickwork.json").read_text())["format"] == "qwen2_moe"


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_shared_expert_and_experts_sum_to_dense(dense, tmp_path, arch):
    """Shared expert = half FFN, routed experts = half FFN: 0.5 f + 0.5 f = the dense f."""
    models, dirs = dense
    half = dirs[f"{arch}_half"]
    out = upcycle_moe(dirs[arch], [half, half], tmp_path / "moe", shared_expert=half,
                      router_std=1.0, seed=3)  # fmt: skip
    _same_logits(_load(out, "Qwen2MoeForCausalLM"), models[arch], seed=3)
    sd = load_file(out / "model.safetensors")
    assert not sd["model.layers.0.mlp.shared_expert_gate.weight"].any()  # sigmoid(0) = 1/2
    down = load_file(half / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    torch.testing.assert_close(sd["model.layers.0.mlp.shared_expert.down_proj.weight"], 2 * down)
    assert not sd["model.layers.0.self_attn.q_proj.bias"].any()  # Llama has none: zeros
    settings = json.loads((out / "brickwork.json").read_text())["settings"]
    assert settings["shared_expert_gate"] == "constant"


def test_mistral_to_mixtral_and_llama_to_qwen2_moe(dense, tmp_path):
    models, dirs = dense
    out = upcycle_to_mixtral(dirs["mistral"], [dirs["mistral"]] * 2, tmp_path / "mx",
                             router_std=1.0)  # fmt: skip
    moe = _load(out, "MixtralForCausalLM")
    assert moe.config.sliding_window == 4096
    _same_logits(moe, models["mistral"])
    out = upcycle_moe(dirs["llama"], [dirs["llama"]] * 2, tmp_path / "q", format="qwen2_moe",
                      router_std=1.0)  # fmt: skip
    _same_logits(_load(out, "Qwen2MoeForCausalLM"), models["llama"])


def _nothing_written(tmp_path):
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".moe", "moe"))]


def test_bad_shared_expert_and_format_write_nothing(dense, tmp_path):
    _, dirs = dense
    llama, qwen = dirs["llama"], dirs["qwen2"]
    with pytest.raises(IncompatibleModelsError, match="shared_expert: config model_type='qwen2'"):
        upcycle_moe(llama, [llama, llama], tmp_path / "moe", shared_expert=qwen)
    _nothing_written(tmp_path)
    with pytest.raises(IncompatibleModelsError, match="qwen2.*biases.*qwen2_moe"):
        upcycle_to_mixtral(qwen, [qwen, qwen], tmp_path / "moe")
    _nothing_written(tmp_path)
    with pytest.raises(BrickworkError, match="Mixtral has no shared expert"):
        upcycle_to_mixtral(llama, [llama, llama], tmp_path / "moe", shared_expert=llama)
    _nothing_written(tmp_path)
    narrow = tmp_path / "narrow"
    torch.manual_seed(1)
    _save(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_KW, "hidden_size": 48})),
          narrow)  # fmt: skip
    with pytest.raises(IncompatibleModelsError, match="shared_expert: config hidden_size=48"):
        upcycle_moe(llama, [llama, llama], tmp_path / "moe", shared_expert=narrow)
    _nothing_written(tmp_path)
    shutil.rmtree(narrow)


def test_shared_expert_may_be_wider(dense, tmp_path):
    models, dirs = dense
    wide = tmp_path / "wide"
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(**{**_KW, "intermediate_size": 96})
    _save(transformers.LlamaForCausalLM(cfg), wide)
    out = upcycle_moe(dirs["llama"], [dirs["llama"]] * 2, tmp_path / "moe", shared_expert=wide)
    moe = _load(out, "Qwen2MoeForCausalLM")
    assert moe.config.shared_expert_intermediate_size == 96
    assert moe.config.moe_intermediate_size == 64
