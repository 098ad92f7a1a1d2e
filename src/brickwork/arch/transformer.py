"""Which tensors of a Hugging Face transformer form its embeddings, attention, FFN and norms.

:func:`transformer_layout` reads the HF config (sizes, model type) and the state-dict tensor
names (prefixes such as ``model.`` / ``bert.`` / ``transformer.``, optional biases, heads) and
returns a :class:`TransformerLayout`: one :class:`LayerParts` per layer and the tensors outside
the layers that read or write the residual stream. It is the one place that knows HF's tensor
names for these model types; alignment, routing and compression build on it.

Supported ``model_type``: ``bert``, ``gpt2``, ``llama``, ``mistral``, ``qwen2``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from brickwork.arch.names import layer_name, num_layers
from brickwork.errors import AlignError


@dataclass(frozen=True)
class Proj:
    """A linear map stored as ``weight`` (+ ``bias``). ``in_axis`` is the weight axis that
    indexes its inputs: 1 for ``nn.Linear`` (out, in), 0 for GPT-2's ``Conv1D`` (in, out)."""

    module: str
    bias: bool
    in_axis: int = 1

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"

    @property
    def out_axis(self) -> int:
        return 1 - self.in_axis

    def tensors(self) -> list[str]:
        return [self.weight] + ([f"{self.module}.bias"] if self.bias else [])


@dataclass(frozen=True)
class LayerParts:
    """One transformer layer. ``q``/``k``/``v`` are separate projections, or all three are the
    same fused projection (GPT-2's ``c_attn``: output columns ``[Q | K | V]``, each ``hidden``
    wide); ``qkv_offsets`` is where Q, K and V start along its output axis."""

    index: int
    q: Proj
    k: Proj
    v: Proj
    o: Proj
    qkv_offsets: tuple[int, int, int]
    ffn_in: tuple[Proj, ...]  # gate + up (Llama) or the one input projection
    ffn_out: Proj
    norms: tuple[str, ...]  # every norm weight / bias tensor of the layer (over hidden)


@dataclass(frozen=True)
class TransformerLayout:
    model_type: str
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    rope: bool  # rotary position embeddings: Q/K dimensions are tied in rotating pairs
    layers: tuple[LayerParts, ...]
    embeddings: tuple[str, ...]  # (rows, hidden) tables added into the residual stream
    stream_norms: tuple[str, ...]  # norms outside the layers (embedding LN, final norm)
    readers: tuple[Proj, ...]  # projections outside the layers that read the stream
    pooler: Proj | None  # BERT's pooler (reads the stream; its output read by pooler_readers)
    pooler_readers: tuple[Proj, ...]
    mlm_transform: Proj | None  # BERT MLM head: stream -> dense -> LayerNorm -> tied decoder
    mlm_norm: tuple[str, ...]
    mlm_decoder: Proj | None


@dataclass(frozen=True)
class _Template:
    container: str  # the layer list inside the base model
    attn: tuple[str, str, str, str] | tuple[str, str]  # q, k, v, o  or  fused qkv, o
    ffn_in: tuple[str, ...]
    ffn_out: str
    norms: tuple[str, ...]
    conv1d: bool
    rope: bool
    embeddings: tuple[str, ...]
    stream_norms: tuple[str, ...]
    ignored: tuple[str, ...]  # buffers that are no parameters (suffixes)


_LLAMA = _Template(
    container="layers",
    attn=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    norms=("input_layernorm", "post_attention_layernorm"),
    conv1d=False,
    rope=True,
    embeddings=("embed_tokens",),
    stream_norms=("norm",),
    ignored=("rotary_emb.inv_freq",),
)
_TEMPLATES: dict[str, _Template] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "bert": _Template(
        container="encoder.layer",
        attn=(
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ),
        ffn_in=("intermediate.dense",),
        ffn_out="output.dense",
        norms=("attention.output.LayerNorm", "output.LayerNorm"),
        conv1d=False,
        rope=False,
        embeddings=(
            "embeddings.word_embeddings",
            "embeddings.position_embeddings",
            "embeddings.token_type_embeddings",
        ),
        stream_norms=("embeddings.LayerNorm",),
        ignored=("embeddings.position_ids", "embeddings.token_type_ids"),
    ),
    "gpt2": _Template(
        container="h",
        attn=("attn.c_attn", "attn.c_proj"),
        ffn_in=("mlp.c_fc",),
        ffn_out="mlp.c_proj",
        norms=("ln_1", "ln_2"),
        conv1d=True,
        rope=False,
        embeddings=("wte", "wpe"),
        stream_norms=("ln_f",),
        ignored=("attn.bias", "attn.masked_bias"),
    ),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_TEMPLATES))
# Heads at the model's root that read the residual stream (axis 1 of a Linear weight).
_STREAM_HEADS = ("lm_head", "score", "qa_outputs")


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise AlignError(
        f"expected a transformers PretrainedConfig or its dict, got {type(config).__name__}"
    )


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def transformer_layout(config: Any, names: Iterable[str]) -> TransformerLayout:
    """The parts of an HF transformer of a supported ``model_type`` (see module docstring).

    Raises :class:`~brickwork.errors.AlignError` for an unknown model type, a tensor inside a
    layer that is no known part, or a layer index beyond the config's layer count."""
    cfg = _config_dict(config)
    model_type = cfg.get("model_type")
    if model_type not in _TEMPLATES:
        raise AlignError(
            f"no permutation spec for model_type '{model_type}'. Supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; for other models pass spec= explicitly."
        )
    t = _TEMPLATES[model_type]
    names = list(names)
    base = _base_prefix(t, names, model_type)
    n_layers = num_layers(names, cfg)
    hidden = int(_first(cfg, "hidden_size", "n_embd"))
    n_heads = int(_first(cfg, "num_attention_heads", "n_head"))
    n_kv = int(_first(cfg, "num_key_value_heads") or n_heads)
    head_dim = int(_first(cfg, "head_dim") or hidden // n_heads)
    ffn = int(_first(cfg, "intermediate_size", "n_inner") or 4 * hidden)
    if n_heads % n_kv:
        raise AlignError(
            f"config num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}"
        )
    present = set(names)
    layers = tuple(_layer(t, base, i, present, hidden, n_kv * head_dim) for i in range(n_layers))
    _check_layer_tensors(t, base, names, layers, n_layers)
    return _with_outside(t, base, present, model_type, hidden, n_heads, n_kv, head_dim, ffn, layers)


def _base_prefix(t: _Template, names: list[str], model_type: str) -> str:
    container = t.container + "."
    prefixes = set()
    for n in names:
        ln = layer_name(n)
        if ln is not None and ln.prefix.endswith(container):
            prefixes.add(ln.prefix[: -len(container)])
    if len(prefixes) != 1:
        found = sorted(prefixes) or "none"
        raise AlignError(
            f"cannot find the layers of this {model_type} model: expected tensor names "
            f"'<prefix>{t.container}.<i>.…' with one prefix, found prefixes {found}. "
            "Pass the model's own state-dict names."
        )
    return prefixes.pop()


def _proj(t: _Template, name: str, present: set[str]) -> Proj:
    return Proj(name, f"{name}.bias" in present, 0 if t.conv1d else 1)


def _layer(
    t: _Template, base: str, i: int, present: set[str], hidden: int, kv_width: int
) -> LayerParts:
    at = f"{base}{t.container}.{i}."
    if len(t.attn) == 2:  # fused [Q | K | V] columns (GPT-2)
        qkv = _proj(t, at + t.attn[0], present)
        q = k = v = qkv
        offsets = (0, hidden, 2 * hidden)
    else:
        q, k, v = (_proj(t, at + a, present) for a in t.attn[:3])
        offsets = (0, 0, 0)
    norms = tuple(
        f"{at}{n}.{p}" for n in t.norms for p in ("weight", "bias") if f"{at}{n}.{p}" in present
    )
    return LayerParts(
        index=i,
        q=q,
        k=k,
        v=v,
        o=_proj(t, at + t.attn[-1], present),
        qkv_offsets=offsets,
        ffn_in=tuple(_proj(t, at + f, present) for f in t.ffn_in),
        ffn_out=_proj(t, at + t.ffn_out, present),
        norms=norms,
    )


def layer_tensors(layer: LayerParts) -> set[str]:
    """Every tensor name the layer's parts own."""
    projs = {layer.q, layer.k, layer.v, layer.o, layer.ffn_out, *layer.ffn_in}
    return {name for p in projs for name in p.tensors()} | set(layer.norms)


def _check_layer_tensors(
    t: _Template, base: str, names: list[str], layers: tuple[LayerParts, ...], n_layers: int
) -> None:
    known = set().union(*(layer_tensors(la) for la in layers)) if layers else set()
    container = f"{base}{t.container}."
    for n in names:
        ln = layer_name(n)
        if ln is None or ln.prefix != container or n in known:
            continue
        if any(n.endswith("." + s) for s in t.ignored):
            continue
        if ln.index >= n_layers:
            raise AlignError(
                f"tensor '{n}' is in layer {ln.index} but the config has {n_layers} layers; "
                "pass the config that belongs to these weights."
            )
        expected = sorted(
            {x[len(f"{container}0") :] for x in layer_tensors(layers[0])} if layers else set()
        )
        raise AlignError(
            f"cannot place tensor '{n}' in the permutation spec: layer {ln.index} holds no such "
            f"part. Known layer tensors: {', '.join(expected)}."
        )
    for la in layers:
        missing = sorted(x for x in (la.q.weight, la.o.weight, la.ffn_out.weight) if x not in names)
        if missing:
            raise AlignError(
                f"layer {la.index} lacks tensor(s) {', '.join(missing)}; the state dict does "
                "not match the config's layer count or model type."
            )


def _with_outside(
    t: _Template,
    base: str,
    present: set[str],
    model_type: str,
    hidden: int,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    ffn: int,
    layers: tuple[LayerParts, ...],
) -> TransformerLayout:
    embeddings = tuple(f"{base}{e}.weight" for e in t.embeddings if f"{base}{e}.weight" in present)
    stream_norms = tuple(
        f"{base}{n}.{p}"
        for n in t.stream_norms
        for p in ("weight", "bias")
        if f"{base}{n}.{p}" in present
    )
    readers = [Proj(h, f"{h}.bias" in present) for h in _STREAM_HEADS if f"{h}.weight" in present]
    pooler = Proj(f"{base}pooler.dense", True) if f"{base}pooler.dense.weight" in present else None
    pooler_readers: list[Proj] = []
    for head in ("classifier", "cls.seq_relationship"):
        if f"{head}.weight" in present:
            # BertForSequenceClassification reads the pooler; token classification (no pooler)
            # reads the stream
            (pooler_readers if pooler is not None else readers).append(
                Proj(head, f"{head}.bias" in present)
            )
    mlm = "cls.predictions.transform.dense"
    has_mlm = f"{mlm}.weight" in present
    return TransformerLayout(
        model_type=model_type,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=ffn,
        rope=t.rope,
        layers=layers,
        embeddings=embeddings,
        stream_norms=stream_norms,
        readers=tuple(readers),
        pooler=pooler,
        pooler_readers=tuple(pooler_readers),
        mlm_transform=Proj(mlm, f"{mlm}.bias" in present) if has_mlm else None,
        mlm_norm=tuple(
            f"cls.predictions.transform.LayerNorm.{p}"
            for p in ("weight", "bias")
            if f"cls.predictions.transform.LayerNorm.{p}" in present
        ),
        mlm_decoder=(
            Proj("cls.predictions.decoder", False)
            if "cls.predictions.decoder.weight" in present
            else None
        ),
    )


def outside_tensors(layout: TransformerLayout) -> set[str]:
    """Every tensor outside the layers that the layout places."""
    out = set(layout.embeddings) | set(layout.stream_norms) | set(layout.mlm_norm)
    for p in (*layout.readers, *layout.pooler_readers):
        out |= set(p.tensors())
    for p in (layout.pooler, layout.mlm_transform, layout.mlm_decoder):
        if p is not None:
            out |= set(p.tensors())
    return out
