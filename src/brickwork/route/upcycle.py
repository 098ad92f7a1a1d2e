"""Upcycle dense Llama / Mistral / Qwen2 fine-tunes into one MoE checkpoint, at tensor level.

Each fine-tune's FFN (``mlp.gate_proj/up_proj/down_proj``) becomes one expert; every other
tensor (attention, norms, embeddings, LM head) is the base's, or a merge of the fine-tunes
with any registered merge method; each layer gets a router of shape (n_experts, hidden).

Two output formats, both loaded by ``transformers.AutoModelForCausalLM``:

- ``mixtral`` (``MixtralForCausalLM``): Llama / Mistral inputs without a shared expert.
  Experts are ``block_sparse_moe.experts.{e}.w1/w3/w2``, the names of the published
  Mixtral checkpoints (transformers 4.x loads them as is, 5.x fuses them on load).
- ``qwen2_moe`` (``Qwen2MoeForCausalLM``): chosen for Qwen2 inputs (their q/k/v biases have
  no place in Mixtral) and whenever a shared expert is asked for (Mixtral has none).
  Qwen2-MoE's attention always has q/k/v biases in transformers 4.x, so Llama / Mistral
  inputs get zero biases (the same function) and ``qkv_bias: true``. Its shared expert
  output is ``sigmoid(shared_expert_gate · x) * shared_expert(x)``: by default the gate is
  all zeros and the shared expert's ``down_proj`` is doubled, so every token gets exactly
  ``shared(x)`` (sigmoid(0) * 2 = 1); with mergekit's prompt-based gate the row is the
  unit-norm prompt vector and ``down_proj`` is copied as is. Without a shared expert a
  width-1 all-zero one is written (it adds exactly 0). ``norm_topk_prob: true`` makes its
  routing equal Mixtral's (softmax over the top-k logits).

Memory stays at a few tensors: every output tensor is read, computed and streamed to the
atomic :class:`CheckpointWriter` one at a time. Only the router modes that need a model
(``hidden``, ``task``, ``train``; see :mod:`brickwork.route.routers`) instantiate one,
before anything is written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..checkpoint.provenance import environment
from ..checkpoint.reader import Checkpoint, TensorInfo, open_checkpoint
from ..checkpoint.writer import CheckpointWriter
from ..errors import CheckpointError, IncompatibleModelsError, OutputExistsError, RecipeError
from ..merge.api import check_output_is_not_input
from .hf_moe import MoELayout, mixtral_config, qwen2_moe_config

if TYPE_CHECKING:
    from .routers import RouterData

RouterInit = Literal["random", "hidden", "cheap_embed", "task", "train"]
Format = Literal["auto", "mixtral", "qwen2_moe"]
ROUTER_INITS = ("random", "hidden", "cheap_embed", "task", "train")
SUPPORTED = ("llama", "mistral", "qwen2")
_FFN = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.)mlp\.(?P<proj>gate|up|down)_proj\.weight$"
)
_QKV = re.compile(r"^(?P<stem>.*\.self_attn\.[qkv]_proj)\.weight$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def _check_architecture(ckpts: Mapping[str, Checkpoint], fmt: Format) -> dict[str, Any]:
    """The base and experts share one supported architecture and shape; the shared expert
    (key ``"shared_expert"``) shares the architecture and hidden size. Returns the base's config."""
    problems: list[str] = []
    configs = {k: ck.config or {} for k, ck in ckpts.items()}
    for key, cfg in configs.items():
        mt = cfg.get("model_type")
        if mt not in SUPPORTED:
            problems.append(
                f"{key}: model_type {mt!r}; upcycling takes {', '.join(SUPPORTED)} "
                "(other architectures will get brickwork's own MoE format)."
            )
        elif mt == "qwen2" and fmt == "mixtral":
            problems.append(
                f"{key}: model_type 'qwen2' has q/k/v projection biases, which Mixtral's "
                "attention lacks; use format qwen2_moe (the default for Qwen2 inputs)."
            )
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                problems.append(f"{key}: {flag} is true; Mixtral / Qwen2-MoE have no such biases.")
        if cfg.get("hidden_act", "silu") != "silu":
            problems.append(f"{key}: hidden_act {cfg.get('hidden_act')!r}, expected 'silu'.")
    base_key = next(iter(ckpts))
    ref = ckpts[base_key]
    for key, ck in ckpts.items():
        if key == base_key:
            continue
        shared = key == "shared_expert"
        fields = ("model_type", "hidden_size", "num_hidden_layers") + (
            () if shared else ("intermediate_size",)
        )
        for field in fields:
            if configs[key].get(field) != configs[base_key].get(field):
                problems.append(
                    f"{key}: config {field}={configs[key].get(field)!r}, but the base has "
                    f"{configs[base_key].get(field)!r}"
                    + (
                        " (the shared expert must be of the base's architecture)."
                        if shared
                        else "."
                    )
                )
        names = [n for n in ref.names if _FFN.match(n)] if shared else ref.names
        missing = [n for n in names if n not in ck]
        if missing:
            problems.append(
                f"{key}: lacks {len(missing)} tensor(s) of the base, e.g. '{missing[0]}'."
            )
        extra = [] if shared else [n for n in ck.names if n not in ref]
        if extra:
            problems.append(f"{key}: has {len(extra)} tensor(s) the base lacks, e.g. '{extra[0]}'.")
        for n in names:
            if shared and n in ck:
                m = _FFN.match(n)
                dim = 0 if m and m.group("proj") == "down" else 1
                if ck.info(n).shape[dim] != ref.info(n).shape[dim]:
                    problems.append(
                        f"{key}: tensor '{n}' has shape {list(ck.info(n).shape)}; its hidden "
                        f"dimension must equal the base's {ref.info(n).shape[dim]}."
                    )
            elif n in ck and ck.info(n).shape != ref.info(n).shape:
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
            "cannot upcycle these models into a mixture of experts:\n  - "
            + "\n  - ".join(shown)
            + "\nGive a base and fine-tunes of one Llama, Mistral or Qwen2 architecture."
        )
    return configs[base_key]


def _check_output(out: Path, ckpts: Mapping[str, Checkpoint], force: bool) -> None:
    check_output_is_not_input(out, ckpts)
    o = out.expanduser().resolve()
    if o.exists() and not force:
        raise OutputExistsError(
            f"{o}: already exists. Choose another output path or pass force=True to replace it."
        )


@dataclass
class _Sources:
    """Where every output tensor comes from (tensors in the inputs' dense naming)."""

    ckpts: dict[str, Checkpoint]
    expert_keys: list[str]
    merge_method: str | None
    merge_parameters: Mapping[str, Any] | None
    seed: int
    shared_scale: float  # 2.0 with the constant (zero) shared gate, else 1.0

    def merged(self, name: str) -> torch.Tensor:
        if self.merge_method is None:
            return self.ckpts["base"].get(name)
        from ..merge.api import merge_state_dicts

        out = merge_state_dicts(
            self.merge_method,
            [{name: self.ckpts[k].get(name)} for k in self.expert_keys],
            base={name: self.ckpts["base"].get(name)},
            parameters=self.merge_parameters,
            seed=self.seed,
        )
        return out[name]

    def expert(self, e: int, name: str) -> torch.Tensor:
        return self.ckpts[self.expert_keys[e]].get(name)

    def shared(self, name: str) -> torch.Tensor:
        """The shared expert's tensor as written (``down_proj`` scaled by ``shared_scale``)."""
        if "shared_expert" not in self.ckpts:
            return torch.zeros(self.shared_shape(name), dtype=self.ckpts["base"].info(name).dtype)
        t = self.ckpts["shared_expert"].get(name)
        return t * self.shared_scale if name.endswith("down_proj.weight") else t

    def shared_shape(self, name: str) -> tuple[int, ...]:
        if "shared_expert" in self.ckpts:
            return self.ckpts["shared_expert"].info(name).shape
        d = self.ckpts["base"].info(name).shape[0 if name.endswith("down_proj.weight") else 1]
        return (d, 1) if name.endswith("down_proj.weight") else (1, d)


def _plan(
    src: _Sources,
    layout: MoELayout,
    router: Callable[[int, TensorInfo], torch.Tensor],
    shared_gate: Callable[[int, TensorInfo], torch.Tensor],
) -> list[_Job]:
    base = src.ckpts["base"]
    qwen = layout.fmt == "qwen2_moe"
    jobs: list[_Job] = []
    routed: set[str] = set()
    for name in base.names:
        info = base.info(name)
        m = _FFN.match(name)
        if m is None:
            jobs.append(_Job(info, lambda n=name: src.merged(n)))
            q = _QKV.match(name)
            if qwen and q and f"{q.group('stem')}.bias" not in base:  # Llama/Mistral: zeros
                b = TensorInfo(f"{q.group('stem')}.bias", info.shape[:1], info.dtype)
                jobs.append(_Job(b, lambda b=b: torch.zeros(b.shape, dtype=b.dtype)))
            continue
        prefix, layer, proj = m.group("prefix"), int(m.group("layer")), m.group("proj")
        if prefix not in routed:
            routed.add(prefix)
            hidden = info.shape[0 if proj == "down" else 1]
            r = TensorInfo(layout.router(prefix), (len(src.expert_keys), hidden), info.dtype)
            jobs.append(_Job(r, lambda r=r, li=layer: router(li, r)))
            if qwen:
                g = TensorInfo(layout.shared_gate(prefix), (1, hidden), info.dtype)
                jobs.append(_Job(g, lambda g=g, li=layer: shared_gate(li, g)))
        for e in range(len(src.expert_keys)):
            out = TensorInfo(layout.expert(prefix, e, proj), info.shape, info.dtype)
            jobs.append(_Job(out, lambda e=e, n=name: src.expert(e, n)))
        if qwen:
            s = TensorInfo(layout.shared(prefix, proj), src.shared_shape(name), info.dtype)
            jobs.append(_Job(s, lambda n=name: src.shared(n)))
    return jobs


def upcycle_to_mixtral(
    base: str | os.PathLike,
    experts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    **options: Any,
) -> Path:
    """:func:`upcycle_moe` with ``format="mixtral"`` (no shared expert, no Qwen2 inputs)."""
    return upcycle_moe(base, experts, out, format="mixtral", **options)


def upcycle_moe(
    base: str | os.PathLike,
    experts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    shared_expert: str | os.PathLike | None = None,
    format: Format = "auto",
    top_k: int = 2,
    merge_method: str | None = None,
    merge_parameters: Mapping[str, Any] | None = None,
    router_init: RouterInit = "random",
    router_std: float | None = None,
    router_hidden: torch.Tensor | None = None,
    router_data: RouterData | None = None,
    seed: int = 0,
    shard_size: str | int = "5GB",
    dtype: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Write an MoE model at ``out`` whose expert ``e`` is ``experts[e]``'s FFN.

    ``format="auto"`` writes Mixtral, or Qwen2-MoE for Qwen2 inputs or a ``shared_expert``
    (a model of the base's architecture and hidden size whose FFN every token passes
    through). Non-FFN tensors are ``base``'s (``merge_method=None``) or
    ``merge_state_dicts(merge_method, experts, base=base)`` computed one tensor at a time.

    Router rows (per layer, (n_experts, hidden)):

    - ``"random"``: N(0, ``router_std``), default the config's ``initializer_range``,
      seeded per layer by ``seed``.
    - ``"hidden"``: ``router_hidden`` (layers, experts, hidden) if given, else computed
      from ``router_data``'s prompts (:func:`brickwork.route.routers.hidden_rows`); rows
      are scaled to unit norm, as mergekit-moe.
    - ``"cheap_embed"``: mean token embedding of each expert's prompts, every layer.
    - ``"task"``: centred, scaled centroids of each expert's unlabelled examples
      (:func:`brickwork.route.routers.task_rows`).
    - ``"train"``: ``task`` (or random) rows, then a short router-only training of the
      in-memory MoE (:func:`brickwork.route.routers.train_routers`).

    ``dtype`` ("float32", "float16", "bfloat16") casts every output tensor; by default each
    keeps the base's dtype. The output appears atomically; on any error nothing is written.
    """
    from . import routers as R

    if not experts:
        raise RecipeError("upcycle: give at least one fine-tune (expert); got none.")
    if not 1 <= top_k <= len(experts):
        raise RecipeError(
            f"upcycle: top_k must be in [1, number of experts={len(experts)}], got {top_k}."
        )
    if router_init not in ROUTER_INITS:
        raise RecipeError(
            f"upcycle: router_init {router_init!r} is not implemented; known: "
            f"{', '.join(sorted(ROUTER_INITS))}."
        )
    if format not in ("auto", "mixtral", "qwen2_moe"):
        raise RecipeError(f"upcycle: format must be auto, mixtral or qwen2_moe, got {format!r}.")
    if format == "mixtral" and shared_expert is not None:
        raise RecipeError(
            "upcycle: Mixtral has no shared expert; use format qwen2_moe (or auto) with "
            "shared_expert."
        )
    if router_hidden is not None and router_init != "hidden":
        raise RecipeError(
            "upcycle: router_hidden (layers, experts, hidden) goes with router_init='hidden' "
            f"only; got router_init={router_init!r}."
        )
    if router_init != "random" and router_hidden is None:
        R.check_router_data(router_init, router_data, len(experts))
    if dtype is not None and dtype not in _DTYPES:
        raise RecipeError(f"upcycle: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.")
    if merge_method is not None:
        from ..merge.registry import get_method

        get_method(merge_method)  # unknown names fail here, before any work
    out = Path(out)
    ckpts: dict[str, Checkpoint] = {"base": _open(base, "base")}
    expert_keys = [f"expert{e}" for e in range(len(experts))]
    for key, path in zip(expert_keys, experts):
        ckpts[key] = _open(path, key)
    if shared_expert is not None:
        ckpts["shared_expert"] = _open(shared_expert, "shared_expert")
    mt = (ckpts["base"].config or {}).get("model_type")
    fmt: Literal["mixtral", "qwen2_moe"] = (
        format
        if format != "auto"
        else ("qwen2_moe" if mt == "qwen2" or shared_expert is not None else "mixtral")
    )
    cfg = _check_architecture(ckpts, fmt)
    _check_output(out, ckpts, force)
    layers, hidden = int(cfg.get("num_hidden_layers", -1)), int(cfg.get("hidden_size", -1))
    if router_hidden is not None and tuple(router_hidden.shape) != (layers, len(experts), hidden):
        raise RecipeError(
            f"upcycle: router_hidden has shape {list(router_hidden.shape)}, expected "
            f"{[layers, len(experts), hidden]} (layers, experts, hidden_size) for these models."
        )
    std = router_std if router_std is not None else float(cfg.get("initializer_range", 0.02))
    mergekit_gate = (
        shared_expert is not None
        and router_init in ("hidden", "cheap_embed")
        and router_data is not None
        and bool(router_data.shared_positive)
    )
    src = _Sources(
        ckpts, expert_keys, merge_method, merge_parameters, seed, 1.0 if mergekit_gate else 2.0
    )
    layout = MoELayout(fmt)
    base_dir = ckpts["base"].model_dir
    stats: dict[str, Any] = {}

    # -- router rows (layers, experts, hidden), float32 ------------------------------------
    rows = torch.stack(
        [
            torch.randn((len(experts), hidden), generator=torch.Generator().manual_seed(
                seed * 1_000_003 + layer
            )) * std
            for layer in range(layers)
        ]
    )  # fmt: skip
    gate_rows = torch.zeros(layers, hidden)  # shared expert gate: sigmoid(0) = 1/2
    if router_hidden is not None:
        rows = torch.nn.functional.normalize(router_hidden.float(), dim=-1)
    elif router_init in ("hidden", "cheap_embed"):
        rows, shared_rows = R.prompt_rows(
            router_init, base_dir, ckpts["base"], router_data, with_shared=mergekit_gate
        )
        if shared_rows is not None:
            gate_rows = shared_rows
    elif router_init == "task" or (
        router_init == "train" and router_data is not None and router_data.train_init == "task"
    ):
        rows, stats = R.task_rows(base_dir, router_data, progress=progress)
    if router_init == "train":
        rows, train_stats = R.train_routers(
            base_dir,
            merged={
                n: (lambda n=n: src.merged(n)) for n in ckpts["base"].names if not _FFN.match(n)
            },
            expert_ffn=lambda e, name: src.expert(e, name),
            shared_ffn=(src.shared if fmt == "qwen2_moe" else None),
            shared_gate=gate_rows if fmt == "qwen2_moe" else None,
            rows=rows,
            data=router_data,
            top_k=top_k,
            seed=seed,
            progress=progress,
        )
        stats = {**stats, **train_stats}

    def router(layer: int, info: TensorInfo) -> torch.Tensor:
        return rows[layer].to(info.dtype)

    def shared_gate(layer: int, info: TensorInfo) -> torch.Tensor:
        return gate_rows[layer][None].to(info.dtype)

    jobs = _plan(src, layout, router, shared_gate)
    if dtype is not None:
        to = _DTYPES[dtype]
        jobs = [
            _Job(TensorInfo(j.info.name, j.info.shape, to), lambda f=j.compute: f().to(to))
            for j in jobs
        ]
        cfg = {**{k: v for k, v in cfg.items() if k != "torch_dtype"}, "dtype": dtype}
    if fmt == "mixtral":
        out_cfg = mixtral_config(cfg, len(experts), top_k)
    else:
        d_ff = (
            (ckpts["shared_expert"].config or {}).get("intermediate_size") if shared_expert else 1
        )
        out_cfg = qwen2_moe_config(cfg, len(experts), top_k, int(d_ff))
    settings = {
        "format": fmt,
        "top_k": top_k,
        "merge_method": merge_method,
        "merge_parameters": dict(merge_parameters or {}),
        "router_init": router_init,
        "router_std": std if router_init == "random" else None,
        "shared_expert_gate": (
            None if fmt == "mixtral" else ("prompts" if mergekit_gate else "constant")
        ),
        "seed": seed,
        "dtype": dtype,
        **({"router_stats": stats} if stats else {}),
    }
    inputs = {
        "base": {"path": str(base), "sha256": ckpts["base"].checksum()},
        "experts": [
            {"path": str(p), "sha256": ckpts[k].checksum()} for k, p in zip(expert_keys, experts)
        ],
    }
    if shared_expert is not None:
        inputs["shared_expert"] = {
            "path": str(shared_expert),
            "sha256": ckpts["shared_expert"].checksum(),
        }
    _write(out, jobs, out_cfg, ckpts["base"], settings, inputs, shard_size, force, progress)
    return out


def _write(
    out: Path,
    jobs: Sequence[_Job],
    config: Mapping[str, Any],
    base: Checkpoint,
    settings: Mapping[str, Any],
    inputs: Mapping[str, Any],
    shard_size: str | int,
    force: bool,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(j.info.nbytes for j in jobs),
        unit="B",
        unit_scale=True,
        desc="upcycle",
        disable=not progress,
        delay=1.0,
        leave=False,
    )
    infos = [j.info for j in jobs]
    with (
        torch.no_grad(),
        bar,
        CheckpointWriter(
            out, infos, shard_size=shard_size, force=force, side_files=base.model_dir
        ) as w,
    ):
        for j in jobs:
            w.write(j.info.name, j.compute())
            bar.update(j.info.nbytes)
        w.add_text("config.json", json.dumps(config, indent=2) + "\n")
        record = {
            "kind": "route.upcycle",
            "format": settings["format"],
            "settings": settings,
            "inputs": inputs,
            "environment": environment(),
        }
        w.add_text("brickwork.json", json.dumps(record, indent=2) + "\n")
        w.add_text("README.md", _model_card(inputs, settings))


def _model_card(inputs: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    arch = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE"}[settings["format"]]
    shared = inputs.get("shared_expert")
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [moe, {settings['format']}, upcycling, brickwork]",
        "---",
        f"# Upcycled mixture of experts ({arch} format)",
        "",
        f"Non-FFN tensors: {settings['merge_method'] or 'copied from the base'}; "
        f"router init: {settings['router_init']} (seed {settings['seed']}); "
        f"top-{settings['top_k']} of {len(inputs['experts'])} experts"
        + (f"; shared expert gate: {settings['shared_expert_gate']}." if shared else "."),
        "",
        "| role | path | sha256 (first 16) |",
        "| --- | --- | --- |",
        f"| base | `{inputs['base']['path']}` | `{inputs['base']['sha256']}` |",
    ]
    for e, x in enumerate(inputs["experts"]):
        lines.append(f"| expert {e} | `{x['path']}` | `{x['sha256']}` |")
    if shared:
        lines.append(f"| shared expert | `{shared['path']}` | `{shared['sha256']}` |")
    return "\n".join(lines) + "\n"
