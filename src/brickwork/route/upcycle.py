"""Upcycle dense Llama-family fine-tunes into one Mixtral checkpoint, at tensor level.

Each fine-tune's FFN (``mlp.gate_proj/up_proj/down_proj``) becomes one expert
(``block_sparse_moe.experts.{e}.w1/w3/w2``); every other tensor (attention, norms,
embeddings, LM head) is the base's, or a merge of the fine-tunes with any registered merge
method; each layer gets a router ``block_sparse_moe.gate.weight`` (n_experts, hidden).
The output uses the per-expert tensor names of the published Mixtral checkpoints, which
transformers 4.x loads as is and transformers 5.x fuses on load (its conversion mapping).
Memory stays at a few tensors: every output tensor is read, computed and streamed to the
atomic :class:`CheckpointWriter` one at a time; no model is instantiated.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint.provenance import environment
from ..checkpoint.reader import Checkpoint, TensorInfo, open_checkpoint
from ..checkpoint.writer import CheckpointWriter
from ..errors import CheckpointError, IncompatibleModelsError, OutputExistsError, RecipeError
from ..merge.api import check_output_is_not_input

RouterInit = Literal["random", "hidden"]
SUPPORTED = ("llama", "mistral")
_FFN = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.)mlp\.(?P<proj>gate|up|down)_proj\.weight$"
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_EXPERT_NAME = {"gate": "w1", "up": "w3", "down": "w2"}
# MixtralConfig fields that a Llama / Mistral config.json may carry with the same meaning.
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


@dataclass(frozen=True)
class _Job:
    info: TensorInfo
    compute: Callable[[], torch.Tensor]


def _open(path: str | os.PathLike, role: str) -> Checkpoint:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{role} '{path}': no such file or directory.")
    ck = open_checkpoint(p)
    if ck.config is None:
        raise CheckpointError(
            f"{role} '{path}': no config.json; upcycling needs a Hugging Face model directory "
            "(config.json + safetensors) to know the architecture."
        )
    return ck


def _check_architecture(ckpts: Mapping[str, Checkpoint]) -> dict[str, Any]:
    """Every input is a bias-free Llama/Mistral of one shape; returns the base's config."""
    problems: list[str] = []
    configs = {k: ck.config or {} for k, ck in ckpts.items()}
    for key, cfg in configs.items():
        mt = cfg.get("model_type")
        if mt == "qwen2":
            problems.append(
                f"{key}: model_type 'qwen2' has q/k/v projection biases, which Mixtral's "
                "attention lacks, so a Mixtral export would drop them. Qwen2 inputs need a "
                "Qwen2-MoE export (not implemented yet)."
            )
        elif mt not in SUPPORTED:
            problems.append(
                f"{key}: model_type {mt!r}; the Mixtral export takes {', '.join(SUPPORTED)} "
                "(other architectures will get brickwork's own MoE format)."
            )
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                problems.append(f"{key}: {flag} is true; Mixtral has no such biases.")
        if cfg.get("hidden_act", "silu") != "silu":
            problems.append(f"{key}: hidden_act {cfg.get('hidden_act')!r}, Mixtral expects 'silu'.")
    base_key = next(iter(ckpts))
    ref = ckpts[base_key]
    for key, ck in ckpts.items():
        if key == base_key:
            continue
        for field in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if configs[key].get(field) != configs[base_key].get(field):
                problems.append(
                    f"{key}: config {field}={configs[key].get(field)!r}, but the base has "
                    f"{configs[base_key].get(field)!r}."
                )
        missing = [n for n in ref.names if n not in ck]
        extra = [n for n in ck.names if n not in ref]
        if missing:
            problems.append(
                f"{key}: lacks {len(missing)} tensor(s) of the base, e.g. '{missing[0]}'."
            )
        if extra:
            problems.append(f"{key}: has {len(extra)} tensor(s) the base lacks, e.g. '{extra[0]}'.")
        for n in ref.names:
            if n in ck and ck.info(n).shape != ref.info(n).shape:
                problems.append(
                    f"{key}: tensor '{n}' has shape {list(ck.info(n).shape)}, the base "
                    f"{list(ref.info(n).shape)}."
                )
    if not any(_FFN.match(n) for n in ref.names):
        problems.append(f"{base_key}: no 'layers.N.mlp.gate_proj/up_proj/down_proj' tensors found.")
    if problems:
        shown = problems[:20] + (
            [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        )
        raise IncompatibleModelsError(
            "cannot upcycle these models into a Mixtral checkpoint:\n  - "
            + "\n  - ".join(shown)
            + "\nGive a base and fine-tunes of one Llama or Mistral architecture."
        )
    return configs[base_key]


def _check_output(out: Path, ckpts: Mapping[str, Checkpoint], force: bool) -> None:
    check_output_is_not_input(out, ckpts)
    o = out.expanduser().resolve()
    if o.exists() and not force:
        raise OutputExistsError(
            f"{o}: already exists. Choose another output path or pass force=True to replace it."
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


def _plan(
    ckpts: Mapping[str, Checkpoint],
    expert_keys: Sequence[str],
    merge_tensor: Callable[[str], torch.Tensor],
    router: Callable[[int, TensorInfo], torch.Tensor],
) -> list[_Job]:
    base = ckpts["base"]
    jobs: list[_Job] = []
    routed: set[str] = set()
    for name in base.names:
        m = _FFN.match(name)
        if m is None:
            jobs.append(_Job(base.info(name), lambda n=name: merge_tensor(n)))
            continue
        prefix, layer = m.group("prefix"), int(m.group("layer"))
        moe = f"{prefix}block_sparse_moe."
        if moe not in routed:
            routed.add(moe)
            hidden = base.info(name).shape[1 if m.group("proj") != "down" else 0]
            info = TensorInfo(
                f"{moe}gate.weight", (len(expert_keys), hidden), base.info(name).dtype
            )
            jobs.append(_Job(info, lambda i=info, li=layer: router(li, i)))
        for e, key in enumerate(expert_keys):
            out = f"{moe}experts.{e}.{_EXPERT_NAME[m.group('proj')]}.weight"
            info = TensorInfo(out, base.info(name).shape, base.info(name).dtype)
            jobs.append(_Job(info, lambda k=key, n=name: ckpts[k].get(n)))
    return jobs


def upcycle_to_mixtral(
    base: str | os.PathLike,
    experts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    top_k: int = 2,
    merge_method: str | None = None,
    merge_parameters: Mapping[str, Any] | None = None,
    router_init: RouterInit = "random",
    router_std: float | None = None,
    router_hidden: torch.Tensor | None = None,
    seed: int = 0,
    shard_size: str | int = "5GB",
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Write a Mixtral model at ``out`` whose expert ``e`` is ``experts[e]``'s FFN.

    Non-FFN tensors are ``base``'s (``merge_method=None``) or
    ``merge_state_dicts(merge_method, experts, base=base)`` computed one tensor at a time.
    ``router_init="random"``: N(0, router_std) with ``router_std`` defaulting to the config's
    ``initializer_range``, seeded per layer by ``seed``. ``router_init="hidden"``: row ``e``
    of layer ``l``'s router is ``router_hidden[l, e]`` (shape (layers, experts, hidden): e.g.
    the mean hidden state that layer sees on prompts for expert ``e``), scaled to unit norm,
    as mergekit-moe's ``hidden`` mode. ``dtype`` ("float32", "float16", "bfloat16") casts
    every output tensor; by default each keeps the base's dtype. The output appears
    atomically; on any error nothing is written.
    """
    if not experts:
        raise RecipeError("upcycle: give at least one fine-tune (expert); got none.")
    if not 1 <= top_k <= len(experts):
        raise RecipeError(
            f"upcycle: top_k must be in [1, number of experts={len(experts)}], got {top_k}."
        )
    if router_init not in ("random", "hidden"):
        raise RecipeError(
            f"upcycle: router_init {router_init!r} is not implemented; known: hidden, random."
        )
    if (router_init == "hidden") != (router_hidden is not None):
        raise RecipeError(
            "upcycle: router_hidden (layers, experts, hidden) goes with router_init='hidden' "
            f"and only with it; got router_init={router_init!r} and router_hidden "
            f"{'given' if router_hidden is not None else 'missing'}."
        )
    if dtype is not None and dtype not in _DTYPES:
        raise RecipeError(f"upcycle: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.")
    if merge_method is not None:
        from ..merge.registry import get_method

        get_method(merge_method)  # unknown names fail here, before any work
    out = Path(out)
    ckpts: dict[str, Checkpoint] = {"base": _open(base, "base")}
    expert_keys = [f"expert{e}" for e in range(len(experts))]
    for key, path in zip(expert_keys, experts):
        ckpts[key] = _open(path, f"{key}")
    cfg = _check_architecture(ckpts)
    _check_output(out, ckpts, force)
    if router_hidden is not None:
        want = (
            int(cfg.get("num_hidden_layers", -1)),
            len(experts),
            int(cfg.get("hidden_size", -1)),
        )
        if tuple(router_hidden.shape) != want:
            raise RecipeError(
                f"upcycle: router_hidden has shape {list(router_hidden.shape)}, expected "
                f"{list(want)} (layers, experts, hidden_size) for these models."
            )
    std = router_std if router_std is not None else float(cfg.get("initializer_range", 0.02))

    def merge_tensor(name: str) -> torch.Tensor:
        if merge_method is None:
            return ckpts["base"].get(name)
        from ..merge.api import merge_state_dicts

        merged = merge_state_dicts(
            merge_method,
            [{name: ckpts[k].get(name)} for k in expert_keys],
            base={name: ckpts["base"].get(name)},
            parameters=merge_parameters,
            seed=seed,
        )
        return merged[name]

    def router(layer: int, info: TensorInfo) -> torch.Tensor:
        if router_hidden is not None:
            v = router_hidden[layer].float()  # (experts, hidden)
            return torch.nn.functional.normalize(v, dim=-1).to(info.dtype)
        g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
        return (torch.randn(info.shape, generator=g) * std).to(info.dtype)

    jobs = _plan(ckpts, expert_keys, merge_tensor, router)
    if dtype is not None:
        to = _DTYPES[dtype]
        jobs = [
            _Job(TensorInfo(j.info.name, j.info.shape, to), lambda f=j.compute: f().to(to))
            for j in jobs
        ]
        cfg = {**{k: v for k, v in cfg.items() if k != "torch_dtype"}, "dtype": dtype}
    with CheckpointWriter(out, [j.info for j in jobs], shard_size=shard_size, force=force) as w:
        for j in jobs:
            w.write(j.info.name, j.compute())
        w.add_text(
            "config.json", json.dumps(mixtral_config(cfg, len(experts), top_k), indent=2) + "\n"
        )
        w.copy_from(ckpts["base"].model_dir)
        settings = {
            "top_k": top_k,
            "merge_method": merge_method,
            "merge_parameters": dict(merge_parameters or {}),
            "router_init": router_init,
            "router_std": std if router_init == "random" else None,
            "seed": seed,
            "dtype": dtype,
        }
        inputs = {
            "base": {"path": str(base), "sha256": ckpts["base"].checksum()},
            "experts": [
                {"path": str(p), "sha256": ckpts[k].checksum()}
                for k, p in zip(expert_keys, experts)
            ],
        }
        w.add_text(
            "brickwork.json",
            json.dumps(
                {
                    "kind": "route.upcycle",
                    "format": "mixtral",
                    "settings": settings,
                    "inputs": inputs,
                    "environment": environment(),
                },
                indent=2,
            )
            + "\n",
        )
        w.add_text("README.md", _model_card(inputs, settings))
    return out


def _model_card(inputs: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moe, mixtral, upcycling, brickwork]",
        "---",
        "# Upcycled mixture of experts (Mixtral format)",
        "",
        f"Non-FFN tensors: {settings['merge_method'] or 'copied from the base'}; "
        f"router init: {settings['router_init']} (seed {settings['seed']}); "
        f"top-{settings['top_k']} of {len(inputs['experts'])} experts.",
        "",
        "| role | path | sha256 (first 16) |",
        "| --- | --- | --- |",
        f"| base | `{inputs['base']['path']}` | `{inputs['base']['sha256']}` |",
    ]
    for e, x in enumerate(inputs["experts"]):
        lines.append(f"| expert {e} | `{x['path']}` | `{x['sha256']}` |")
    return "\n".join(lines) + "\n"
