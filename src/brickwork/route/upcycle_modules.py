"""Upcycle fine-tuned copies of any PyTorch model (BERT encoders, generic modules) into one
model whose FFNs are mixtures of experts, saved in brickwork's own MoE format.

Published MoE architectures only describe decoder LMs (:mod:`brickwork.route.upcycle`
writes those as Mixtral / Qwen2-MoE). For everything else, at module level: the base is
deep-copied, its non-FFN parameters are kept or merged from the fine-tunes with any
registered merge method, and every FFN that :func:`~brickwork.route.moefy.find_ffns`
recognises (BERT ``intermediate``/``output.dense``, ``gate/up/down_proj`` MLPs,
``Linear -> activation -> Linear``) is replaced by a :class:`MoEBlock` whose expert ``e``
is fine-tune ``e``'s FFN, biases included (``out_bias="expert"``: each expert keeps its
output bias, weighted by its routing weight like the rest of its output, so identical
experts give the dense FFN exactly). Routers (one linear layer per FFN, no bias):

- ``"random"``: N(0, ``router_std``), seeded per FFN.
- ``"task"``: per expert, FFN inputs of that expert's calibration batches run through the
  **base**, every token one example; rows are the centred, scaled centroids of
  :func:`brickwork.route.routers.centroid_rows` (logits spread with std ``router_scale``).

:func:`upcycle_hf_models` does this for Hugging Face directories (``AutoModel``) and
writes with :func:`brickwork.route.format.save_moe`; ``brickwork.load(out)`` reads it back.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import CheckpointError, IncompatibleModelsError, RecipeError
from .format import get_module, replace_module
from .moe import MoEBlock, MoELayer
from .moefy import FFNSpec, find_ffns

ModuleRouterInit = Literal["random", "task"]


def _check_same(base: nn.Module, experts: Sequence[nn.Module]) -> None:
    ref = {k: v.shape for k, v in base.state_dict().items()}
    problems = []
    for i, m in enumerate(experts):
        sd = {k: v.shape for k, v in m.state_dict().items()}
        missing, extra = [k for k in ref if k not in sd], [k for k in sd if k not in ref]
        if missing:
            problems.append(f"expert{i}: lacks {len(missing)} tensor(s), e.g. '{missing[0]}'")
        if extra:
            problems.append(f"expert{i}: has {len(extra)} extra tensor(s), e.g. '{extra[0]}'")
        for k in ref:
            if k in sd and sd[k] != ref[k]:
                problems.append(
                    f"expert{i}: '{k}' has shape {list(sd[k])}, the base {list(ref[k])}"
                )
                break
    if problems:
        raise IncompatibleModelsError(
            "cannot upcycle these modules: they are not copies of one architecture:\n  - "
            + "\n  - ".join(problems[:20])
        )


def _linear(model: nn.Module, path: str) -> nn.Linear:
    m = get_module(model, path)
    if not isinstance(m, nn.Linear):
        raise RecipeError(f"upcycle: '{path}' is a {type(m).__name__}, expected nn.Linear.")
    return m


def _expert_layer(spec: FFNSpec, models: Sequence[nn.Module], top_k: int) -> MoELayer:
    """A float32 MoELayer whose expert ``e`` is ``models[e]``'s FFN at ``spec``."""
    ups = [_linear(m, spec.up) for m in models]
    downs = [_linear(m, spec.down) for m in models]
    glu = spec.activation == "swiglu"
    d_ff, d_model = ups[0].weight.shape
    has_bias = downs[0].bias is not None
    if glu and (has_bias or ups[0].bias is not None):
        raise RecipeError(f"upcycle: {spec.replace}: biases in a SwiGLU FFN are not supported.")
    moe = MoELayer(
        d_model, d_ff, len(models), top_k=top_k, activation=spec.activation,
        routing="topk_softmax", out_bias=("none" if glu or not has_bias else "expert"),
    )  # fmt: skip
    with torch.no_grad():
        for e, (m, up, down) in enumerate(zip(models, ups, downs)):
            w = up.weight.float()  # (d_ff, d_model)
            if glu:
                w = torch.cat([_linear(m, spec.gate).weight.float(), w])  # gate rows first
            moe.gate_up[e].copy_(w)
            moe.down[e].copy_(down.weight.float())  # (d_model, d_ff)
            if moe.b_in is not None:
                moe.b_in[e].copy_(up.bias.float()) if up.bias is not None else moe.b_in[e].zero_()
            if moe.b_out is not None:
                moe.b_out[e].copy_(down.bias.float())
    return moe


@torch.no_grad()
def _ffn_inputs(model: nn.Module, spec: FFNSpec, batches: Sequence[Any], cap: int) -> torch.Tensor:
    """Inputs of the FFN at ``spec`` over ``batches``: (tokens, d_model), at most ``cap``."""
    from .moefy import _call

    seen: list[torch.Tensor] = []
    h = get_module(model, spec.replace).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
    )
    try:
        for b in batches:
            _call(model, b)
    finally:
        h.remove()
    x = torch.cat(seen)  # (tokens, d_model)
    if len(x) > cap:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:cap]]
    return x


def upcycle_module(
    base: nn.Module,
    experts: Sequence[nn.Module],
    *,
    ffns: Sequence[str | FFNSpec] | None = None,
    top_k: int = 2,
    merge_method: str | None = None,
    merge_parameters: Mapping[str, Any] | None = None,
    router_init: ModuleRouterInit = "random",
    router_std: float = 0.02,
    router_scale: float = 1.0,
    examples: Sequence[Sequence[Any]] | None = None,
    max_tokens: int = 4096,
    seed: int = 0,
) -> nn.Module:
    """A new module: ``base`` with every FFN (or those in ``ffns``) an MoE of the experts'.

    ``examples[e]`` are calibration batches (model inputs: a tensor, a tuple of positional
    arguments, or a dict of keyword arguments) of expert ``e``'s domain, for
    ``router_init="task"``. Inputs are not modified; the result is in eval mode.
    """
    if len(experts) < 2:
        raise RecipeError(f"upcycle: give at least two experts, got {len(experts)}.")
    if not 1 <= top_k <= len(experts):
        raise RecipeError(f"upcycle: top_k must be in [1, {len(experts)}], got {top_k}.")
    if router_init not in ("random", "task"):
        raise RecipeError(
            f"upcycle: router_init {router_init!r} is not available for generic modules; "
            "known: random, task."
        )
    if router_init == "task":
        for e in range(len(experts)):
            if examples is None or e >= len(examples) or not examples[e]:
                raise RecipeError(
                    f"experts[{e}].examples: router_init task needs calibration batches of "
                    "each expert's domain; none given."
                )
    _check_same(base, experts)
    new = copy.deepcopy(base).eval()
    specs = find_ffns(new, ffns)
    ffn_params = {
        f"{p}.{n}"
        for s in specs
        for p in (s.up, s.down, *([s.gate] if s.gate else []))
        for n, _ in get_module(new, p).named_parameters()
    }
    if merge_method is not None:
        from ..merge.api import merge_state_dicts

        keep = [k for k in base.state_dict() if k not in ffn_params]
        merged = merge_state_dicts(
            merge_method,
            [{k: m.state_dict()[k] for k in keep} for m in experts],
            base={k: base.state_dict()[k] for k in keep},
            parameters=merge_parameters,
            seed=seed,
        )
        new.load_state_dict(merged, strict=False)
    rows: list[torch.Tensor] = []
    if router_init == "task":
        from .routers import centroid_rows

        for s in specs:
            x = [_ffn_inputs(base, s, examples[e], max_tokens) for e in range(len(experts))]
            r, _ = centroid_rows([xi[:, None] for xi in x], router_scale)  # (1, E, d_model)
            rows.append(r[0])
    for i, s in enumerate(specs):
        moe = _expert_layer(s, experts, top_k)
        with torch.no_grad():
            if rows:
                moe.router.weight.copy_(rows[i])
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                moe.router.weight.copy_(
                    torch.randn(moe.router.weight.shape, generator=g) * router_std
                )
        dtype = _linear(new, s.up).weight.dtype
        for p in s.identity:
            replace_module(new, p, nn.Identity())
        replace_module(new, s.replace, MoEBlock(moe.to(dtype)))
    return new.eval()


def upcycle_hf_models(
    base: str | os.PathLike,
    experts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    examples: Sequence[Sequence[str]] | None = None,
    tokenizer: str | os.PathLike | None = None,
    max_length: int = 256,
    force: bool = False,
    **options: Any,
) -> Path:
    """:func:`upcycle_module` on Hugging Face directories loaded with ``AutoModel``, written in
    brickwork's MoE format at ``out`` (tokenizer files copied from ``base``). ``examples``
    are texts per expert for ``router_init="task"``, tokenised with the base's tokenizer."""
    from transformers import AutoModel

    from .format import save_moe

    def load(p: str | os.PathLike, role: str) -> nn.Module:
        if not (Path(p) / "config.json").is_file():
            raise CheckpointError(f"{role} '{p}': no config.json; give a Hugging Face directory.")
        return AutoModel.from_pretrained(str(p)).eval()

    base_model = load(base, "base")
    expert_models = [load(p, f"experts[{i}]") for i, p in enumerate(experts)]
    batches = None
    if options.get("router_init") == "task" and examples is not None:
        from .routers import RouterData, load_tokenizer

        tok = load_tokenizer(Path(base), RouterData(tokenizer=tokenizer))
        batches = [
            [dict(tok(t, truncation=True, max_length=max_length, return_tensors="pt")) for t in ex]
            for ex in examples
        ]
    new = upcycle_module(base_model, expert_models, examples=batches, **options)
    settings = {k: v for k, v in options.items() if isinstance(v, str | int | float | None)}
    settings["format"] = "brickwork"
    return save_moe(
        new,
        out,
        copy_from=base,
        inputs=[base, *experts],
        provenance={
            "kind": "route.upcycle",
            "settings": settings,
            "inputs": {"base": str(base), "experts": [str(p) for p in experts]},
        },
        force=force,
    )
