"""The two Hugging Face MoE formats that upcycling writes: their config.json and the names
of the MoE tensors of one layer (``prefix`` = ``...layers.N.``).

- Mixtral (``MixtralForCausalLM``): ``block_sparse_moe.gate`` and per-expert
  ``block_sparse_moe.experts.{e}.w1/w3/w2``, the names of the published Mixtral checkpoints.
- Qwen2-MoE (``Qwen2MoeForCausalLM``): ``mlp.gate``, ``mlp.experts.{e}.{gate,up,down}_proj``,
  ``mlp.shared_expert.*`` and ``mlp.shared_expert_gate``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

_MIXTRAL_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}

# Config fields that a Llama / Mistral / Qwen2 config.json may carry with the same meaning.
_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "sliding_window",
    "attention_dropout",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "dtype",
    "torch_dtype",
    "transformers_version",
)


def mixtral_config(config: Mapping[str, Any], n_experts: int, top_k: int) -> dict[str, Any]:
    """A Mixtral config.json from a Llama / Mistral one (same attention, norms, rope)."""
    cfg = {k: config[k] for k in _CONFIG_KEYS if k in config}
    if "rope_parameters" not in cfg and "rope_theta" not in cfg:
        cfg["rope_theta"] = 10000.0  # Llama's default; Mixtral's would be 1e6
    cfg.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        output_router_logits=False,
        router_aux_loss_coef=0.001,
        router_jitter_noise=0.0,
    )
    return cfg


def qwen2_moe_config(
    config: Mapping[str, Any], n_experts: int, top_k: int, shared_d_ff: int
) -> dict[str, Any]:
    """A Qwen2-MoE config.json from a Llama / Mistral / Qwen2 one.

    Sliding windows keep their layers: Qwen2's ``layer_types`` are copied, Mistral's
    ``sliding_window`` (every layer) becomes ``layer_types: [sliding_attention, ...]``.
    """
    cfg = {k: config[k] for k in _CONFIG_KEYS if k in config}
    if "rope_parameters" not in cfg and "rope_theta" not in cfg:
        cfg["rope_theta"] = 10000.0
    n_layers = int(config["num_hidden_layers"])
    if config.get("model_type") == "qwen2":
        for k in ("use_sliding_window", "max_window_layers", "layer_types"):
            if k in config:
                cfg[k] = config[k]
        if not config.get("use_sliding_window"):
            cfg["sliding_window"] = None
    elif config.get("sliding_window") is not None:  # Mistral: every layer slides
        cfg.update(use_sliding_window=True, max_window_layers=n_layers)
        cfg["layer_types"] = ["sliding_attention"] * n_layers
    else:
        cfg.update(use_sliding_window=False, sliding_window=None)
    if not cfg.get("use_sliding_window"):
        cfg["layer_types"] = ["full_attention"] * n_layers
    cfg.update(
        architectures=["Qwen2MoeForCausalLM"],
        model_type="qwen2_moe",
        num_experts=n_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=int(config["intermediate_size"]),
        shared_expert_intermediate_size=shared_d_ff,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        qkv_bias=True,
        output_router_logits=False,
        router_aux_loss_coef=0.001,
    )
    return cfg


@dataclass(frozen=True)
class MoELayout:
    """Where one output format puts the MoE parts of a layer (``prefix`` = ``...layers.N.``)."""

    fmt: Literal["mixtral", "qwen2_moe"]

    def router(self, prefix: str) -> str:
        moe = "block_sparse_moe" if self.fmt == "mixtral" else "mlp"
        return f"{prefix}{moe}.gate.weight"

    def expert(self, prefix: str, e: int, proj: str) -> str:
        if self.fmt == "mixtral":
            return f"{prefix}block_sparse_moe.experts.{e}.{_MIXTRAL_PROJ[proj]}.weight"
        return f"{prefix}mlp.experts.{e}.{proj}_proj.weight"

    def shared(self, prefix: str, proj: str) -> str:
        return f"{prefix}mlp.shared_expert.{proj}_proj.weight"

    def shared_gate(self, prefix: str) -> str:
        return f"{prefix}mlp.shared_expert_gate.weight"
