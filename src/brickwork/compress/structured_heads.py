"""Attention heads removed from BERT and GPT-2: the smaller modules, and brickwork's format for
them (``brickwork compress prune --structured heads``; the choice of heads is
:mod:`brickwork.compress.structured`'s).

**Why not a Hugging Face directory.** transformers 5 (checked on 5.24) has no ``pruned_heads``
config field and no ``PreTrainedModel.prune_heads``, and its BERT and GPT-2 attention derive
the head size from the config: ``BertSelfAttention`` sets ``attention_head_size =
hidden_size / num_attention_heads`` and builds ``query`` / ``key`` / ``value`` as
``Linear(hidden, hidden)`` and ``attention.output.dense`` as ``Linear(hidden, hidden)``;
``GPT2Attention`` sets ``head_dim = n_embd / n_head``, ``c_attn = Conv1D(3·n_embd, n_embd)``
and ``c_proj = Conv1D(n_embd, n_embd)``. Neither config has a ``head_dim`` field. With
``hidden`` fixed by the residual stream, the attention width is ``hidden`` whatever the head
count, so no config describes ``n < num_attention_heads`` heads of the original size: fewer
heads in the config would make each head *wider* (a different function), and keeping the
count keeps every tensor at full size. (Rewriting the model as another architecture that
has an explicit head size, or shipping modelling code for ``trust_remote_code``, were
rejected: the first is not the user's model type, the second puts executable code, written
against private attribute names of transformers, into the output.)

**What is done instead.** A pruned module keeps its transformers class and config (the
config still says the original ``num_attention_heads``, from which the head size follows)
and its attention modules are resized: for BERT ``query`` / ``key`` / ``value`` become
``Linear(hidden, n·d)`` and ``attention.output.dense`` ``Linear(n·d, hidden)``, with
``num_attention_heads = n`` and ``all_head_size = n·d`` on the attention module; for GPT-2
``c_attn`` becomes ``Conv1D(3·n·d, hidden)`` and ``c_proj`` ``Conv1D(hidden, n·d)`` with
``num_heads = n`` and ``split_size = n·d``. The head size ``d`` and the softmax scale are
unchanged, so the kept heads compute exactly what they computed before. A directory is
written in brickwork's format (like :mod:`brickwork.compress.lowrank_format`)::

    out/
      model.safetensors      the smaller tensors (streamed, one at a time)
      brickwork.json         {"format": "brickwork.heads", "format_version": 1,
                              "base": {"kind": "transformers", "class": "BertModel",
                                       "config": "base_config.json"},
                              "heads": {"head_dim": 8, "layers": {"0": 3, "1": 3}},
                              "kept": ..., "parameters": ..., provenance}
      base_config.json       the config the skeleton is built from (original head count;
                             FFN changes of ``ffn+heads`` applied); not ``config.json``, so
                             ``AutoModel.from_pretrained(out)`` refuses the directory instead
                             of loading full-size attention with missing weights
      README.md, tokenizer   model card; side files of the input carried over

:func:`load_structured` rebuilds it: the class from ``base_config.json``, attention resized
as listed, every tensor loaded strictly. The result is an ordinary ``BertModel`` /
``GPT2LMHeadModel`` instance (use it with transformers' Trainer, pipelines' model argument,
etc.); only ``save_pretrained`` of it does not load back in transformers (its
``from_pretrained`` stops with a size-mismatch error on the attention tensors).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError

FORMAT = "brickwork.heads"
FORMAT_VERSION = 1
META = "brickwork.json"
BASE_CONFIG = "base_config.json"
#: model types whose head count the config cannot express (resized modules + this format)
RESIZED_HEADS = ("bert", "gpt2")

__all__ = ["FORMAT", "RESIZED_HEADS", "load_structured", "shrink_attention_in_place"]


def shrink_attention_in_place(model: nn.Module, layout: Any, heads: dict[int, int]) -> None:
    """Replace, in ``model`` itself, each listed layer's attention projections by new,
    smaller (uninitialised) ones holding ``heads[layer]`` heads of ``layout.head_dim``, and
    set the attention module's head count (module docstring). Weights are loaded after."""
    from transformers.pytorch_utils import Conv1D

    hidden, d = layout.hidden, layout.head_dim
    for la in layout.layers:
        n = heads.get(la.index)
        if n is None:
            continue
        width = n * d
        attn_path, _, q_attr = la.q.module.rpartition(".")
        attn = model.get_submodule(attn_path)
        o_path, _, o_attr = la.o.module.rpartition(".")
        o_parent = model.get_submodule(o_path)
        if layout.model_type == "gpt2":  # fused [Q | K | V] Conv1D: (in, out) weights
            setattr(attn, q_attr, Conv1D(3 * width, hidden))
            setattr(o_parent, o_attr, Conv1D(hidden, width))
            attn.num_heads, attn.split_size = n, width
        elif layout.model_type == "bert":
            for p in (la.q, la.k, la.v):
                setattr(attn, p.module.rpartition(".")[2], nn.Linear(hidden, width, bias=p.bias))
            setattr(o_parent, o_attr, nn.Linear(width, hidden, bias=la.o.bias))
            attn.num_attention_heads, attn.all_head_size = n, width
        else:
            raise CheckpointError(
                f"attention of a '{layout.model_type}' model is not resized by brickwork; "
                f"its config holds the head count. Resized: {', '.join(RESIZED_HEADS)}."
            )


def heads_meta(
    cfg: dict[str, Any], layout: Any, kept: dict[int, dict[str, list[int]]]
) -> dict[str, Any]:
    """The format fields of ``brickwork.json`` for a pruned ``cfg`` (model docstring)."""
    archs = cfg.get("architectures") or []
    default = "BertModel" if layout.model_type == "bert" else "GPT2Model"
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base": {
            "kind": "transformers",
            "class": archs[0] if archs else default,
            "config": BASE_CONFIG,
        },
        "heads": {
            "head_dim": layout.head_dim,
            "layers": {str(i): len(r["heads"]) for i, r in kept.items() if "heads" in r},
        },
    }


def load_structured(path: str | os.PathLike) -> nn.Module:
    """Rebuild a head-pruned BERT / GPT-2 written by ``prune_structured`` (module docstring),
    in eval mode. Raises :class:`~brickwork.errors.CheckpointError` naming the file and
    field for a directory that is not this format or whose tensors do not fit."""
    from ..arch.transformer import transformer_layout
    from ..route.format import _read_weights, _skeleton

    path = Path(path).expanduser()
    f = path / META
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        hint = (
            " It has a config.json: load it with transformers' AutoModel*.from_pretrained."
            if (path / "config.json").is_file()
            else ""
        )
        raise CheckpointError(f"{f}: not readable JSON ({e}).{hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"{f}: field 'format' is {found!r}, expected '{FORMAT}' (a BERT / GPT-2 with "
            "attention heads removed by brickwork compress prune --structured heads)."
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{f}: field 'format_version' is {meta.get('format_version')!r}; this brickwork "
            f"reads version {FORMAT_VERSION}. Upgrade brickwork to load it."
        )
    try:
        head_dim = int(meta["heads"]["head_dim"])
        heads = {int(i): int(n) for i, n in meta["heads"]["layers"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{f}: field 'heads' is damaged ({e!r}).") from None
    model = _skeleton(path, meta, None)
    layout = transformer_layout(model.config, model.state_dict())
    if layout.head_dim != head_dim:
        raise CheckpointError(
            f"{f}: heads.head_dim is {head_dim} but {path / BASE_CONFIG} gives "
            f"{layout.head_dim} (hidden / num_attention_heads); the files do not belong together."
        )
    shrink_attention_in_place(model, layout, heads)
    sd = _read_weights(path)
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        detail = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"{path}: a tensor does not fit the rebuilt model: {detail}."
        ) from None
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in sd if k in params}
    # a tied tensor (GPT-2's lm_head = wte) is stored once: missing only if not shared
    tied = {k for k in res.missing_keys if k in params and params[k].data_ptr() in loaded}
    problems = [f"missing tensor '{k}'" for k in res.missing_keys if k not in tied][:5]
    problems += [f"unexpected tensor '{k}'" for k in res.unexpected_keys[:5]]
    if problems:
        raise CheckpointError(
            f"{path}: the weights do not match the rebuilt {type(model).__name__}: "
            + "; ".join(problems)
            + ". Was it written by another brickwork version?"
        )
    return model.eval()
