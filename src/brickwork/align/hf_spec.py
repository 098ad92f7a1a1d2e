"""Permutation specs of Hugging Face transformers, from the config and the tensor names.

The parts (which tensors are Q, K, V, O, the FFN, the norms) come from
:func:`brickwork.arch.transformer.transformer_layout`; this module turns them into groups:

- ``<layer>.mlp`` — the FFN hidden units: rows of the input projection(s) (BERT
  ``intermediate.dense``, GPT-2 ``c_fc``, Llama ``gate_proj`` and ``up_proj``) and their biases,
  columns of the output projection.
- ``<layer>.heads`` (``heads=True``) — attention heads as whole blocks. With grouped-query
  attention a unit is one KV group: its ``head_dim`` K and V rows and the
  ``head_dim * n_heads / n_kv`` rows of its query heads (and the matching O columns) move
  together, so every query head keeps reading its own K/V head. GPT-2's fused ``c_attn`` has
  three members on one axis, at offsets 0, ``hidden`` and ``2 * hidden``.
- nested groups (their ``parent`` is the heads group; they act on the head now at position
  ``k``, in target coordinates, see :class:`~brickwork.align.spec.PermutationGroup`):

  - ``<layer>.heads.<k>.q`` (``heads=True`` and ``query_heads=True``, GQA only) — the query
    heads inside KV group ``k`` (``query_heads=False`` keeps them in order inside their
    group: a spec without nested groups, for OT fusion and ZipIt);
  - ``<layer>.heads.<k>.qk`` (``within_head=True``, absolute positions only: BERT, GPT-2) —
    one permutation of the ``head_dim`` dimensions shared by Q and K of the head
    (``q · k`` is a sum over dimensions, so any common order gives the same scores). RoPE
    models (Llama, Mistral, Qwen2) get none: RoPE rotates dimension pairs ``(i, i + d/2)``
    with a frequency that depends on ``i``, so reordering Q/K dimensions changes the scores;
  - ``<layer>.heads.<k>.vo`` (``within_head=True``) — the dimensions of V head ``k`` and the
    matching O columns of every query head that reads it (positions do not touch V).
- ``residual`` (``residual=True``) — the residual stream, one group over the whole model:
  the embedding tables' columns, every LayerNorm / RMSNorm weight and bias (both are
  equivariant under a permutation of the features they normalise), the columns of every
  projection that reads the stream (Q/K/V, FFN input, LM head, classification heads, BERT's
  pooler and MLM transform), the rows and biases of every projection that writes it (O, FFN
  output), and BERT's MLM transform output (its decoder is tied to the word embeddings).
- ``<prefix>pooler`` — BERT's pooler units, when a head reads them (sequence classification,
  next-sentence prediction).

Git Re-Basin (Ainsworth et al. 2023, arXiv:2209.04836, Appendix A) permutes the residual
stream, heads and FFNs of transformers by hand-written specs; here the spec is derived.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from brickwork.align.spec import Member, PermutationGroup, PermutationSpec
from brickwork.arch.names import layer_name
from brickwork.arch.transformer import (
    LayerParts,
    Proj,
    TransformerLayout,
    _config_dict,
    outside_tensors,
    transformer_layout,
)
from brickwork.errors import AlignError

# Non-layer tensors that index no hidden feature (vocabulary biases, position-id buffers).
_FREE_OUTSIDE = ("cls.predictions.bias", "cls.predictions.decoder.bias", "position_ids")


def hf_permutation_spec(
    config: Any,
    names: Iterable[str],
    *,
    heads: bool = True,
    within_head: bool = True,
    residual: bool = False,
    query_heads: bool = True,
    output_stream: bool = False,
) -> PermutationSpec:
    """The permutation groups of an HF BERT / GPT-2 / Llama / Mistral / Qwen2 model.

    ``config`` is the model's ``PretrainedConfig`` (or its dict), ``names`` its state-dict
    tensor names. See the module docstring for the groups. Raises
    :class:`~brickwork.errors.AlignError` for an unsupported ``model_type`` or a tensor it
    cannot place. With ``residual=True`` a model whose output is the stream itself (no head)
    is refused, since the permutation would reorder its output, unless ``output_stream=True``
    (ZipIt, which merges the stream and so changes the output anyway)."""
    names = list(names)
    layout = transformer_layout(config, names)
    groups: list[PermutationGroup] = []
    for layer in layout.layers:
        groups.append(_ffn_group(layout, layer))
        if heads or within_head:
            groups.extend(
                _head_groups(
                    layout, layer, heads=heads, within_head=within_head, query_heads=query_heads
                )
            )
    pooler = _pooler_group(layout)
    if pooler is not None:
        groups.append(pooler)
    if residual:
        _check_outside(layout, names)
        if not output_stream:
            _check_stream_is_read(layout, config)
        groups.append(_residual_group(layout))
    return PermutationSpec(tuple(groups))


def _rows(p: Proj, *, block: int = 1, offset: int = 0) -> list[Member]:
    """The output units of ``p``: weight rows (Conv1D: columns) and bias."""
    out = [Member(p.weight, p.out_axis, block, offset)]
    if p.bias:
        out.append(Member(f"{p.module}.bias", 0, block, offset))
    return out


def _cols(p: Proj, *, block: int = 1, offset: int = 0) -> list[Member]:
    return [Member(p.weight, p.in_axis, block, offset)]


def _prefix(layer: LayerParts) -> str:
    """``model.layers.3`` for a tensor ``model.layers.3.self_attn.o_proj``."""
    ln = layer_name(layer.o.weight)
    return f"{ln.prefix}{ln.index}"


def _ffn_group(layout: TransformerLayout, layer: LayerParts) -> PermutationGroup:
    members = [m for p in layer.ffn_in for m in _rows(p)] + _cols(layer.ffn_out)
    return PermutationGroup(
        f"{_prefix(layer)}.mlp", layout.ffn, tuple(members), (layer.ffn_out.module,)
    )


def _head_groups(
    layout: TransformerLayout,
    layer: LayerParts,
    *,
    heads: bool,
    within_head: bool,
    query_heads: bool = True,
) -> list[PermutationGroup]:
    d, n_kv = layout.head_dim, layout.n_kv_heads
    g = layout.n_heads // n_kv  # query heads per KV group
    q_off, k_off, v_off = layer.qkv_offsets
    name = f"{_prefix(layer)}.heads"
    out: list[PermutationGroup] = []
    if heads:
        members = (
            _rows(layer.q, block=d * g, offset=q_off)
            + _rows(layer.k, block=d, offset=k_off)
            + _rows(layer.v, block=d, offset=v_off)
            + _cols(layer.o, block=d * g)
        )
        out.append(PermutationGroup(name, n_kv, tuple(members), (layer.o.module,)))
    parent = name if heads else None
    for kv in range(n_kv):
        at = f"{name}.{kv}"
        first_q = kv * g * d  # first query row of this KV group
        if heads and query_heads and g > 1:
            members = _rows(layer.q, block=d, offset=q_off + first_q) + _cols(
                layer.o, block=d, offset=first_q
            )
            out.append(
                PermutationGroup(f"{at}.q", g, tuple(members), (layer.o.module,), parent=parent)
            )
        if not within_head:
            continue
        if not layout.rope:
            members = [
                m for j in range(g) for m in _rows(layer.q, offset=q_off + first_q + j * d)
            ] + _rows(layer.k, offset=k_off + kv * d)
            consumers = tuple(dict.fromkeys((layer.q.module, layer.k.module)))
            out.append(PermutationGroup(f"{at}.qk", d, tuple(members), consumers, parent=parent))
        members = _rows(layer.v, offset=v_off + kv * d) + [
            m for j in range(g) for m in _cols(layer.o, offset=first_q + j * d)
        ]
        out.append(
            PermutationGroup(f"{at}.vo", d, tuple(members), (layer.o.module,), parent=parent)
        )
    return out


def _pooler_group(layout: TransformerLayout) -> PermutationGroup | None:
    if layout.pooler is None or not layout.pooler_readers:
        return None  # BertModel's pooler output is a model output: not permutable
    members = _rows(layout.pooler) + [m for p in layout.pooler_readers for m in _cols(p)]
    consumers = tuple(p.module for p in layout.pooler_readers)
    return PermutationGroup(layout.pooler.module, layout.hidden, tuple(members), consumers)


def _residual_group(layout: TransformerLayout) -> PermutationGroup:
    members: list[Member] = [Member(e, 1) for e in layout.embeddings]
    members += [Member(n, 0) for n in layout.stream_norms]
    consumers: list[str] = []
    for layer in layout.layers:
        members += [Member(n, 0) for n in layer.norms]
        for p in dict.fromkeys((layer.q, layer.k, layer.v)):
            members += _cols(p)
        members += _rows(layer.o)
        members += [m for p in layer.ffn_in for m in _cols(p)]
        members += _rows(layer.ffn_out)
        consumers += [layer.q.module, layer.ffn_in[0].module]
    readers = list(layout.readers)
    if layout.pooler is not None:
        readers.append(layout.pooler)
    if layout.mlm_transform is not None:
        readers.append(layout.mlm_transform)
        # the transform's output feeds the decoder, which is tied to the word embeddings, so
        # it carries the residual permutation too
        members += _rows(layout.mlm_transform) + [Member(n, 0) for n in layout.mlm_norm]
        if layout.mlm_decoder is not None:
            members += _cols(layout.mlm_decoder)
    for p in readers:
        members += _cols(p)
    consumers += [p.module for p in readers]
    return PermutationGroup("residual", layout.hidden, tuple(members), tuple(consumers))


def _check_stream_is_read(layout: TransformerLayout, config: Any) -> None:
    """A model whose output *is* the residual stream (a bare ``BertModel``, ``LlamaModel``,
    ``GPT2Model``: no LM or classification head) would return its features permuted, so it
    computes another function; the stream may be permuted only when a head reads it. A head
    tied to the input embeddings is absent from a saved file's tensor names, so a saved
    ``...ForCausalLM`` / ``...LMHeadModel`` (its config's ``architectures``) with
    ``tie_word_embeddings`` counts as read."""
    if layout.readers or layout.pooler_readers or layout.mlm_transform is not None:
        return
    cfg = _config_dict(config)
    archs = cfg.get("architectures") or []
    tied_head = cfg.get("tie_word_embeddings", True) and any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM")) for a in archs
    )
    if tied_head:
        return
    raise AlignError(
        f"residual=True on a {layout.model_type} model without a head "
        f"(architectures: {archs or 'not recorded'}): its output is the residual stream "
        "itself, so permuting the stream would return its features in another order and "
        "change the function. Use residual=False (heads and FFN units only), or align the "
        "model with its LM / classification head."
    )


def _check_outside(layout: TransformerLayout, names: list[str]) -> None:
    """With the residual stream permuted, every tensor outside the layers must be placed."""
    known = outside_tensors(layout)
    for n in names:
        if layer_name(n) is not None or n in known or n.endswith(_FREE_OUTSIDE):
            continue  # layer tensors were checked by the layout
        raise AlignError(
            f"cannot place tensor '{n}' in the residual-stream permutation: it is outside the "
            f"layers and is no known embedding, norm or head of a {layout.model_type} model "
            f"(known: {', '.join(sorted(known))}). Use residual=False, or remove the tensor."
        )
