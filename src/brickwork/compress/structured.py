"""Structured pruning: remove FFN units and attention heads from the shapes
(``brickwork compress prune --structured ffn|heads|ffn+heads --ratio R``).

**What is removed.** FFN unit ``j`` of a layer is row ``j`` of every FFN input projection
(Llama's ``gate_proj`` and ``up_proj``, BERT's ``intermediate.dense``, GPT-2's ``c_fc``; with
its bias entry) and column ``j`` of the FFN output projection. An attention *group* is one
key/value head with the ``num_attention_heads / num_key_value_heads`` query heads that read
it (without GQA: one head): its ``head_dim`` rows of Q (per query head), K and V (+ biases)
and the matching input columns of O. Which tensors these are, and ``head_dim`` / GQA, comes
from :func:`brickwork.arch.transformer.transformer_layout` (the same discovery as alignment).

**The same count in every layer.** Hugging Face configs hold one ``intermediate_size`` and
one ``num_attention_heads``, so ``ratio`` keeps ``round(ratio · n)`` units (heads) in *every*
layer; each layer keeps its own top-importance ones (indices kept in ascending order, so the
pruned model computes exactly what the original computes with the removed units' outputs set
to zero). With GQA whole KV groups go: ``num_key_value_heads`` and ``num_attention_heads``
shrink together, and the kept head count must be a multiple of the group size. The config is
rewritten (``intermediate_size`` / GPT-2 ``n_inner``; ``num_attention_heads``,
``num_key_value_heads`` and an explicit ``head_dim``, since Llama otherwise derives it as
``hidden_size / num_attention_heads``).

**BERT and GPT-2 heads** cannot be described by their configs: both derive ``head_dim =
hidden_size / num_attention_heads`` and have no ``head_dim`` field, and transformers 5 (5.24)
no longer has the ``pruned_heads`` config field nor ``prune_heads``. Their heads are still
removed from the shapes (same importance, same kept heads; each head is its ``head_dim``
rows of Q, K and V with biases, GPT-2's fused ``c_attn`` columns at offsets 0, hidden and
2·hidden, and its input columns of the output projection): a module input gives the same
transformers class with resized attention modules, and a directory is written in
brickwork's ``brickwork.heads`` format, loaded by :func:`load_structured` (not
``AutoModel.from_pretrained``, which refuses it: no ``config.json``). The reasons and the
format are in :mod:`brickwork.compress.structured_heads`.

**Importance** (higher is kept).

* ``magnitude``: ``‖W_in[j, :]‖₂ · ‖W_out[:, j]‖₂`` — the L2 norm of the unit's input rows
  (all FFN input projections together; for a group its Q, K and V rows) times the norm of its
  output column(s) in the output projection.
* ``wanda`` (activation-aware; Sun et al. 2023, arXiv:2306.11695, in its structured form as
  in An et al. 2024 *FLAP*, arXiv:2312.11983): ``sqrt(Σ_{c ∈ unit} (XᵀX)_cc · ‖W_out[:, c]‖²)``
  over the unit's input columns ``c`` of the output projection (one for an FFN unit,
  ``head_dim`` per query head for a group), ``XᵀX`` being the output projection's input Gram
  matrix on the calibration data (:func:`brickwork.statistics_for`, padding masked) — the
  norm of the unit's contribution to the residual stream, summed over the tokens.

**Memory.** A model directory is streamed: tensors are read one at a time, once for the
importance scores and once for writing (``wanda`` also loads the model once to measure the
Gram diagonals).

A unit whose output column(s) are zero has importance 0 under both, and removing it leaves
the model's function unchanged (tested exactly).

**Torch-Pruning is not used.** Its dependency graph discovers coupled channels by tracing a
generic ``nn.Module``; here the coupling of a transformer's FFN units and heads is known
from the config and tensor names (``transformer_layout``), and the output must be a Hugging
Face checkpoint whose *config* describes the new shapes, which Torch-Pruning does not write
(it edits modules in place, and its GQA head pruning needs model-specific handling). For
generic MLPs brickwork's :func:`brickwork.align.permutation_spec` already gives the coupled
channel groups (pruning a group = keeping a subset of its units along every member axis);
:func:`prune_groups` uses it (``prune_structured`` of a module without a config).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import DataError, RecipeError
from .structured_heads import RESIZED_HEADS, load_structured

Importance = Literal["magnitude", "wanda"]
IMPORTANCES = ("magnitude", "wanda")
_HEADS_IN_CONFIG = ("llama", "mistral", "qwen2")

__all__ = [
    "StructuredResult",
    "load_structured",
    "prune_groups",
    "prune_structured",
    "structured_plan",
]


@dataclass
class StructuredResult:
    """``kept``: per layer, ``{"ffn": [unit indices], "heads": [query-head indices]}``;
    ``config``: the new config dict; ``model``: the smaller module (module input) or
    ``None``; ``out``: the written directory (directory input) or ``None``."""

    kept: dict[int, dict[str, list[int]]]
    config: dict[str, Any]
    parameters: tuple[int, int]  # (before, after)
    model: nn.Module | None = None
    out: Path | None = None


# -- options and importance ------------------------------------------------------------------


def _check_ratio(name: str, r: float | None) -> None:
    if r is not None and not (0.0 < float(r) <= 1.0):
        raise RecipeError(f"{name} (kept fraction) must be in (0, 1], got {r}.")


def _keep_count(n: int, ratio: float | None, what: str) -> int:
    if ratio is None:
        return n
    k = round(float(ratio) * n)
    if k < 1:
        raise RecipeError(
            f"ratio {ratio} keeps {k} of {n} {what} per layer: removing all of them is not a "
            "model. Choose a larger ratio."
        )
    return k


def _top(scores: torch.Tensor, k: int) -> list[int]:
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return sorted(int(i) for i in order)


def _out_rows(t: torch.Tensor, out_axis: int) -> torch.Tensor:
    return t.float() if out_axis == 0 else t.float().T  # (out, in)


def _col_sq(w_out: torch.Tensor, in_axis: int) -> torch.Tensor:
    """Squared L2 norm of each input column of an output projection: (in,)."""
    return (w_out.float() ** 2).sum(dim=1 - in_axis)


# -- the plan: which units each layer keeps --------------------------------------------------


def structured_plan(
    get: Any,
    layout: Any,
    *,
    ffn_ratio: float | None,
    heads: float | None,
    importance: Importance,
    grams: dict[str, torch.Tensor] | None = None,
) -> dict[int, dict[str, list[int]]]:
    """Kept FFN units and query heads per layer. ``get(name)`` returns a tensor; ``grams``
    (wanda) maps an output projection's weight name to the diagonal of its input Gram."""
    kept: dict[int, dict[str, list[int]]] = {}
    n_ffn = layout.ffn
    group = layout.n_heads // layout.n_kv_heads
    k_ffn = _keep_count(n_ffn, ffn_ratio, "FFN units")
    k_heads = _keep_count(layout.n_heads, heads, "attention heads")
    if k_heads % group:
        raise RecipeError(
            f"ratio {heads} keeps {k_heads} of {layout.n_heads} attention heads, but with GQA "
            f"the heads come in groups of {group} sharing one key/value head "
            f"({layout.n_kv_heads} groups): the kept count must be a multiple of {group}. "
            f"Choose a ratio that keeps a whole number of groups (e.g. "
            f"{max(1, round(k_heads / group)) * group / layout.n_heads:g})."
        )
    for la in layout.layers:
        rec: dict[str, list[int]] = {}
        if ffn_ratio is not None:
            out_sq = _col_sq(get(la.ffn_out.weight), la.ffn_out.in_axis)  # (ffn,)
            if importance == "wanda":
                score = (grams[la.ffn_out.weight].float().clamp_min(0) * out_sq).sqrt()
            else:
                in_sq = sum(
                    (_out_rows(get(p.weight), p.out_axis) ** 2).sum(1) for p in la.ffn_in
                )  # (ffn,)
                score = in_sq.sqrt() * out_sq.sqrt()
            rec["ffn"] = _top(score, k_ffn) if k_ffn < n_ffn else list(range(n_ffn))
        if heads is not None:
            g_score = _group_scores(get, la, layout, importance, grams)  # (n_kv,)
            k_groups = k_heads // group
            groups = _top(g_score, k_groups)
            rec["heads"] = [g * group + i for g in groups for i in range(group)]
        kept[la.index] = rec
    return kept


def _group_scores(
    get: Any, la: Any, layout: Any, importance: str, grams: dict[str, torch.Tensor] | None
) -> torch.Tensor:
    hd, n_kv = layout.head_dim, layout.n_kv_heads
    group = layout.n_heads // n_kv
    o_sq = _col_sq(get(la.o.weight), la.o.in_axis)  # (n_heads * hd,)
    if importance == "wanda":
        o_sq = o_sq * grams[la.o.weight].float().clamp_min(0)
    out_part = o_sq.reshape(n_kv, group * hd).sum(1)  # (n_kv,)
    if importance == "wanda":
        return out_part.sqrt()
    q = _out_rows(get(la.q.weight), la.q.out_axis)
    k = _out_rows(get(la.k.weight), la.k.out_axis)
    v = _out_rows(get(la.v.weight), la.v.out_axis)
    oq, ok, ov = la.qkv_offsets
    width_q, width_kv = layout.n_heads * hd, n_kv * hd
    in_part = (
        (q[oq : oq + width_q] ** 2).sum(1).reshape(n_kv, group * hd).sum(1)
        + (k[ok : ok + width_kv] ** 2).sum(1).reshape(n_kv, hd).sum(1)
        + (v[ov : ov + width_kv] ** 2).sum(1).reshape(n_kv, hd).sum(1)
    )
    return in_part.sqrt() * out_part.sqrt()


# -- applying the plan to tensors ------------------------------------------------------------


def _index_map(layout: Any, kept: dict[int, dict[str, list[int]]]) -> dict[str, list[Any]]:
    """tensor name -> [(axis, LongTensor of kept indices), ...]."""
    hd = layout.head_dim
    group = layout.n_heads // layout.n_kv_heads
    plan: dict[str, list[Any]] = {}

    def add(name: str, axis: int, idx: list[int]) -> None:
        plan.setdefault(name, []).append((axis, torch.tensor(idx, dtype=torch.long)))

    for la in layout.layers:
        rec = kept.get(la.index, {})
        if "ffn" in rec:
            for p in la.ffn_in:
                add(p.weight, p.out_axis, rec["ffn"])
                if p.bias:
                    add(f"{p.module}.bias", 0, rec["ffn"])
            add(la.ffn_out.weight, la.ffn_out.in_axis, rec["ffn"])
        if "heads" in rec:
            q_idx = [h * hd + d for h in rec["heads"] for d in range(hd)]
            groups = sorted({h // group for h in rec["heads"]})
            kv_idx = [g * hd + d for g in groups for d in range(hd)]
            if la.q == la.k:  # fused [Q | K | V] (GPT-2's c_attn): one index over all three
                parts = zip(la.qkv_offsets, (q_idx, kv_idx, kv_idx), strict=True)
                todo = [(la.q, [off + i for off, idx in parts for i in idx])]
            else:
                todo = [(la.q, q_idx), (la.k, kv_idx), (la.v, kv_idx)]
            for p, idx in todo:
                add(p.weight, p.out_axis, idx)
                if p.bias:
                    add(f"{p.module}.bias", 0, idx)
            add(la.o.weight, la.o.in_axis, q_idx)
    return plan


def _apply(t: torch.Tensor, ops: list[Any]) -> torch.Tensor:
    for axis, idx in ops:
        t = t.index_select(axis, idx)
    return t.contiguous()


def _new_config(cfg: dict[str, Any], layout: Any, kept: dict[int, dict[str, list[int]]]) -> dict:
    new = dict(cfg)
    first = kept[layout.layers[0].index] if layout.layers else {}
    if "ffn" in first:
        key = "n_inner" if layout.model_type == "gpt2" else "intermediate_size"
        new[key] = len(first["ffn"])
    if "heads" in first and layout.model_type in _HEADS_IN_CONFIG:
        n_h = len(first["heads"])
        new["num_attention_heads"] = n_h
        new["num_key_value_heads"] = n_h * layout.n_kv_heads // layout.n_heads
        new["head_dim"] = layout.head_dim
    return new


# -- entry point -----------------------------------------------------------------------------


def _check(ffn_ratio: Any, heads: Any, importance: str, model_type: str | None) -> None:
    if ffn_ratio is None and heads is None:
        raise RecipeError("structured pruning needs ffn_ratio and/or heads (kept fractions).")
    _check_ratio("ffn_ratio", ffn_ratio)
    _check_ratio("heads", heads)
    if importance not in IMPORTANCES:
        from ..errors import unknown_name

        raise unknown_name("structured importance", importance, IMPORTANCES)
    if heads is not None and model_type not in _HEADS_IN_CONFIG + RESIZED_HEADS:
        raise RecipeError(
            f"removing attention heads of a '{model_type}' model is not supported. Heads can "
            f"be removed for {', '.join(_HEADS_IN_CONFIG + RESIZED_HEADS)}; prune FFN units "
            "(--structured ffn) here."
        )


def _gram_diags(module: nn.Module, batches: list[Any], layout: Any, names: list[str]) -> dict:
    from ..stats import statistics_for
    from .prune import _to_checkpoint_names

    if not batches:
        raise DataError(
            "importance 'wanda' needs calibration data (the inputs of the output "
            "projections); give text files with --data FILE or batches in Python."
        )
    stats = statistics_for(module, batches, "gram")
    diags = {n: stats.get(n).diagonal().clone() for n in stats.names}  # name -> (in,)
    mapped = _to_checkpoint_names(diags, names, "model")
    need = [la.ffn_out.weight for la in layout.layers] + [la.o.weight for la in layout.layers]
    missing = [n for n in need if n not in mapped]
    if missing:
        raise DataError(f"the collector measured no inputs for {', '.join(missing[:3])}.")
    return mapped


def prune_structured(
    model: str | Path | nn.Module,
    out: str | Path | None = None,
    *,
    ffn_ratio: float | None = None,
    heads: float | None = None,
    importance: Importance = "magnitude",
    data: Sequence[Any] | None = None,
    n_examples: int = 128,
    batch_size: int = 8,
    max_length: int = 128,
    force: bool = False,
    shard_size: str | int = "5GB",
) -> StructuredResult:
    """Remove FFN units (``ffn_ratio``: kept fraction per layer) and / or attention heads
    (``heads``: kept fraction per layer) from a Hugging Face model (module docstring).

    ``model``: a model directory (then ``out`` is required and the smaller model is written
    there atomically with its config, ``brickwork.json`` provenance holding the kept indices,
    and a model card; for BERT / GPT-2 heads brickwork's format instead, loaded by
    :func:`load_structured`) or an ``nn.Module`` with ``.config`` (then a new, smaller module
    is returned; the input is not modified; BERT / GPT-2 heads: same class, attention
    modules resized, config unchanged). ``data``: for ``importance="wanda"``, text files
    (directory input) or batches of ``input_ids`` / ``attention_mask`` (module input)."""
    from ..arch.transformer import transformer_layout

    if isinstance(model, nn.Module) and not hasattr(model, "config"):
        if heads is not None or importance != "magnitude" or ffn_ratio is None:
            raise RecipeError(
                f"{type(model).__name__} has no Hugging Face config: it is pruned through its "
                "permutation spec (prune_groups) with ffn_ratio= as the kept fraction of every "
                "hidden group and magnitude importance; heads= and wanda need a transformer."
            )
        small, groups = prune_groups(model, ratio=ffn_ratio)
        before = sum(t.numel() for t in model.state_dict().values())
        after = sum(t.numel() for t in small.state_dict().values())
        return StructuredResult(groups, {}, (before, after), model=small)  # type: ignore[arg-type]
    if isinstance(model, nn.Module):
        cfg = model.config.to_dict()
        _check(ffn_ratio, heads, importance, cfg.get("model_type"))
        sd = model.state_dict()
        names = list(sd)
        layout = transformer_layout(cfg, names)
        grams = None
        if importance == "wanda":
            grams = _gram_diags(model, list(data or []), layout, names)
        kept = structured_plan(
            sd.__getitem__, layout, ffn_ratio=ffn_ratio, heads=heads, importance=importance,
            grams=grams,
        )  # fmt: skip
        plan = _index_map(layout, kept)
        new_sd = {n: _apply(t, plan[n]) if n in plan else t.clone() for n, t in sd.items()}
        new_cfg = _new_config(cfg, layout, kept)
        config = type(model.config).from_dict(new_cfg)
        small = type(model)(config)
        if heads is not None and layout.model_type in RESIZED_HEADS:
            from .structured_heads import shrink_attention_in_place

            counts = {i: len(r["heads"]) for i, r in kept.items()}
            shrink_attention_in_place(small, layout, counts)
        small.load_state_dict(new_sd)
        small.eval() if not model.training else small.train()
        before = sum(t.numel() for t in sd.values())
        after = sum(t.numel() for t in new_sd.values())
        return StructuredResult(kept, new_cfg, (before, after), model=small)
    if out is None:
        raise RecipeError("prune_structured of a model directory needs out= (the output path).")
    return _prune_dir(
        Path(model), Path(out).expanduser(), ffn_ratio, heads, importance, list(data or []),
        n_examples, batch_size, max_length, force, shard_size,
    )  # fmt: skip


def _prune_dir(
    model: Path,
    out: Path,
    ffn_ratio: float | None,
    heads: float | None,
    importance: str,
    data: list[Any],
    n_examples: int,
    batch_size: int,
    max_length: int,
    force: bool,
    shard_size: str | int,
) -> StructuredResult:
    from ..arch.transformer import transformer_layout
    from ..checkpoint.reader import TensorInfo, open_checkpoint
    from ..checkpoint.writer import CheckpointWriter
    from ..errors import OutputExistsError
    from ..merge.api import check_output_is_not_input

    ck = open_checkpoint(model)
    cfg = ck.config
    if cfg is None:
        raise RecipeError(
            f"{model}: no config.json; structured pruning rewrites the config, so it needs a "
            "Hugging Face model directory."
        )
    _check(ffn_ratio, heads, importance, cfg.get("model_type"))
    check_output_is_not_input(out, {str(model): ck})
    if out.exists() and not force:
        raise OutputExistsError(
            f"{out}: already exists. Choose another output path or pass --force to replace it."
        )
    names = list(ck.names)
    layout = transformer_layout(cfg, names)
    record: dict[str, Any] = {
        "kind": "compress.prune.structured",
        "structured": "+".join(k for k, r in (("ffn", ffn_ratio), ("heads", heads)) if r),
        "ffn_ratio": ffn_ratio,
        "heads_ratio": heads,
        "importance": importance,
    }
    grams = None
    if importance == "wanda":
        if not data:
            raise DataError(
                "importance 'wanda' needs calibration data: give one or more text files with "
                "--data FILE (tokenised with the model's tokenizer)."
            )
        from ..recipe import DataSpec
        from ..stats.data import load_batches, load_hf_module
        from .prune import _file_hash

        where = f"model {model}"
        module = load_hf_module(model, where)
        vocab = getattr(getattr(module, "config", None), "vocab_size", None)
        batches: list[Any] = []
        for f in data:
            spec = DataSpec(
                path=str(f), n_examples=n_examples, batch_size=batch_size, max_length=max_length
            )
            batches += load_batches(spec, model_dir=ck.model_dir, vocab_size=vocab, where=where)
        grams = _gram_diags(module, batches, layout, names)
        record["calibration"] = {
            "files": [{"path": str(f), "sha256": _file_hash(Path(f))} for f in data],
            "n_examples": n_examples,
            "batch_size": batch_size,
            "max_length": max_length,
        }
        del module
    kept = structured_plan(
        ck.get, layout, ffn_ratio=ffn_ratio, heads=heads, importance=importance, grams=grams
    )
    plan = _index_map(layout, kept)
    infos = []
    for n in names:
        info = ck.info(n)
        shape = list(info.shape)
        for axis, idx in plan.get(n, []):
            shape[axis] = len(idx)
        infos.append(TensorInfo(n, tuple(shape), info.dtype))
    new_cfg = _new_config(cfg, layout, kept)
    before = sum(ck.info(n).numel for n in names)
    after = sum(i.numel for i in infos)
    # BERT / GPT-2 heads: brickwork's format (structured_heads), not a transformers directory
    resized = heads is not None and layout.model_type in RESIZED_HEADS
    config_file = "config.json"
    if resized:
        from .structured_heads import BASE_CONFIG, heads_meta

        record = heads_meta(new_cfg, layout, kept) | record
        config_file = BASE_CONFIG
    record |= {"parameters": {"before": before, "after": after}, "kept": kept}
    record["config_changes"] = {k: v for k, v in new_cfg.items() if cfg.get(k) != v}
    with CheckpointWriter(
        out, infos, force=force, shard_size=shard_size, side_files=ck.model_dir,
        exclude=("config.json",) if resized else (),
    ) as writer:  # fmt: skip
        for n in names:
            t = ck.get(n)
            writer.write(n, _apply(t, plan[n]) if n in plan else t)
            del t
        writer.add_text(config_file, json.dumps(new_cfg, indent=2) + "\n")
        _write_card(writer, ck, str(model), record)
    return StructuredResult(kept, new_cfg, (before, after), out=out)


def _write_card(writer: Any, ck: Any, key: str, record: dict[str, Any]) -> None:
    from ..checkpoint.provenance import environment

    env = environment()
    record = {**record, "inputs": {key: ck.checksum()}, "environment": env}
    writer.add_text("brickwork.json", json.dumps(record, indent=2, default=str) + "\n")
    p = record["parameters"]
    changes = ", ".join(f"`{k}` = {v}" for k, v in record["config_changes"].items())
    lines = [
        "---",
        "library_name: transformers",
        "tags: [pruned, structured, brickwork]",
        "---",
        f"# Structurally pruned model ({record['structured']}, {record['importance']})",
        "",
        f"Made with brickwork {env['brickwork']} on {env['created']} from `{key}` "
        f"(sha256 first 16: `{record['inputs'][key]}`).",
        "",
        f"Kept fraction per layer: FFN units {record['ffn_ratio']}, attention heads "
        f"{record['heads_ratio']}; importance `{record['importance']}` (see brickwork."
        "compress.structured). The removed units are gone from the shapes; kept indices per "
        "layer are in `brickwork.json`.",
        "",
        f"Config: {changes or 'unchanged'}.",
        "",
        *(
            [
                "Attention heads of this architecture cannot be described by its config "
                "(head size = hidden / heads, no pruned_heads in transformers 5), so this is "
                "brickwork's format: load it with "
                "`brickwork.compress.structured.load_structured(PATH)` (a transformers "
                f"`{record['base']['class']}` with smaller attention modules).",
                "",
            ]
            if record.get("format")
            else []
        ),
        f"**Parameters:** {p['before']} -> {p['after']} ({p['after'] / p['before']:.4f}).",
        "",
    ]
    writer.add_text("README.md", "\n".join(lines))


def run_structured_cli(
    model: Path,
    out: Path,
    *,
    structured: str,
    ratio: float | None,
    method: str,
    sparsity: float | None,
    nm: str | None,
    data: Sequence[Path],
    n_examples: int,
    batch_size: int,
    max_length: int,
    force: bool,
    shard_size: str,
    t0: float,
) -> str:
    """``brickwork compress prune --structured ...``: checks the flags, returns the summary."""
    import time

    kinds = {"ffn": (True, False), "heads": (False, True), "ffn+heads": (True, True)}
    if structured not in kinds:
        from ..errors import unknown_name

        raise unknown_name("--structured", structured, tuple(kinds))
    if ratio is None:
        raise RecipeError("--structured needs --ratio R (kept fraction per layer, in (0, 1]).")
    if sparsity is not None or nm is not None:
        raise RecipeError(
            "--structured removes whole units (--ratio); --sparsity / --nm are for "
            "unstructured pruning. Give one or the other."
        )
    if method not in IMPORTANCES:
        raise RecipeError(
            f"--structured scores units by --method magnitude or wanda, got '{method}'."
        )
    if method == "magnitude" and data:
        raise RecipeError(
            "magnitude importance uses no calibration data, but --data was given; remove it "
            "or choose --method wanda."
        )
    ffn, heads = kinds[structured]
    res = prune_structured(
        model, out, ffn_ratio=ratio if ffn else None, heads=ratio if heads else None,
        importance=method, data=list(data), n_examples=n_examples, batch_size=batch_size,
        max_length=max_length, force=force, shard_size=shard_size,
    )  # fmt: skip
    before, after = res.parameters
    return (
        f"wrote {res.out}: structured {structured} ({method}), ratio {ratio}, parameters "
        f"{before} -> {after} ({time.perf_counter() - t0:.1f} s)"
    )


# -- generic nn.Modules (MLPs, CNNs) through the permutation spec ----------------------------

_SIZE_ATTRS = {  # module type -> (attribute set from axis 0, attribute set from axis 1)
    nn.Linear: ("out_features", "in_features"),
    nn.Conv1d: ("out_channels", "in_channels"),
    nn.Conv2d: ("out_channels", "in_channels"),
    nn.Conv3d: ("out_channels", "in_channels"),
}


def _member_index(member: Any, kept: list[int]) -> torch.Tensor:
    """The indices along ``member.axis`` that remain when the group keeps units ``kept``
    (indices outside the member's span are kept)."""
    units = torch.tensor(kept, dtype=torch.long)
    span = member.offset + (units.view(-1, 1) * member.block + torch.arange(member.block))
    return span.reshape(-1)


def prune_groups(model: nn.Module, *, ratio: float) -> tuple[nn.Module, dict[str, list[int]]]:
    """Structured magnitude pruning of a generic MLP / CNN (no Hugging Face config): every
    group of :func:`brickwork.align.permutation_spec` (the hidden units, or channels, that are
    coupled across all the tensors that index them: producer rows, norms, consumer columns,
    residual additions) keeps its ``round(ratio · size)`` units of largest
    ``‖producer rows‖₂ · ‖consumer columns‖₂``; along every member axis only those units stay.
    Groups over which a ``LayerNorm`` / ``GroupNorm`` normalises are kept whole (removing a
    unit would change the other units' mean and variance, so the result would no longer be the
    same function even on dead units). Returns a new, smaller module (the input is not
    modified) and the kept units per group."""
    import copy

    from ..align.spec import permutation_spec

    _check_ratio("ratio", ratio)
    spec = permutation_spec(model)
    sd = model.state_dict()
    modules = dict(model.named_modules())
    kept: dict[str, list[int]] = {}
    ops: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for group in spec.groups:
        if group.parent is not None:
            raise RecipeError(
                f"group '{group.name}' is nested in '{group.parent}'; structured pruning of "
                "nested groups (heads) is only supported for Hugging Face transformers."
            )
        owners = [modules.get(m.tensor.rpartition(".")[0]) for m in group.members]
        if any(isinstance(o, (nn.LayerNorm, nn.GroupNorm)) for o in owners):
            # normalised together: removing any unit changes the others' mean and variance
            kept[group.name] = list(range(group.size))
            continue
        k = _keep_count(group.size, ratio, f"units of group '{group.name}'")
        consumers = {f"{c}.weight" for c in group.consumers}
        in_sq = torch.zeros(group.size)
        out_sq = torch.zeros(group.size)
        for m in group.members:
            owner = modules.get(m.tensor.rpartition(".")[0])
            if not m.tensor.endswith("weight") or type(owner) not in _SIZE_ATTRS:
                continue  # norms and biases do not enter the score
            sq = _unit_sq(sd[m.tensor], m, group.size)
            if m.tensor in consumers and m.axis == 1:
                out_sq += sq
            elif m.axis == 0:
                in_sq += sq
        kept[group.name] = _top(in_sq.sqrt() * out_sq.sqrt(), k)
        for m in group.members:
            ops.setdefault(m.tensor, []).append((m.axis, _member_index(m, kept[group.name])))
    small = copy.deepcopy(model)
    with torch.no_grad():
        for name, todo in ops.items():
            mod_name, _, attr = name.rpartition(".")
            mod = small.get_submodule(mod_name)
            new = _apply(sd[name], todo)
            if isinstance(getattr(mod, attr), nn.Parameter):
                setattr(
                    mod, attr, nn.Parameter(new, requires_grad=getattr(mod, attr).requires_grad)
                )
            else:
                setattr(mod, attr, new)
            _resize(mod, attr, new)
    return small, kept


def _unit_sq(t: torch.Tensor, m: Any, size: int) -> torch.Tensor:
    from ..align.spec import unit_view

    return (unit_view(t.detach().float(), m, size) ** 2).sum(1)  # (size,)


def _resize(mod: nn.Module, attr: str, new: torch.Tensor) -> None:
    if attr != "weight":
        return
    attrs = _SIZE_ATTRS.get(type(mod))
    if attrs is not None:
        setattr(mod, attrs[0], new.shape[0])
        setattr(mod, attrs[1], new.shape[1])
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        mod.num_features = new.shape[0]
    elif isinstance(mod, nn.LayerNorm):
        mod.normalized_shape = (new.shape[0],)
    elif isinstance(mod, nn.GroupNorm):
        per_group = mod.num_channels // mod.num_groups
        mod.num_channels = new.shape[0]
        mod.num_groups = new.shape[0] // per_group
