"""Layer structure from tensor names, for any transformer-like checkpoint.

A layer tensor is one whose name holds ``<container>.<index>.`` with a container
named ``layers``, ``layer``, ``h``, ``blocks`` or ``block`` (Llama/Mistral/Qwen2,
BERT, GPT-2, T5/ViT-style); the first such occurrence is the layer index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_LAYER = re.compile(
    r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks|block)\.)(?P<index>\d+)(?P<suffix>\..+)$"
)
_POST = re.compile(
    r"(^|\.)(lm_head|norm|ln_f|final_layer_norm|final_layernorm|pooler|classifier|score|head)(\.|$)"
)
_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|shared|tok_embeddings)\.weight$")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    suffix: str

    def with_index(self, index: int) -> str:
        return f"{self.prefix}{index}{self.suffix}"


def layer_name(name: str) -> LayerName | None:
    m = _LAYER.match(name)
    if m is None:
        return None
    return LayerName(m.group("prefix"), int(m.group("index")), m.group("suffix"))


def num_layers(names: Iterable[str], config: dict[str, Any] | None = None) -> int:
    """Number of layers: from the HF config when it says, else 1 + the largest index."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if config and isinstance(config.get(key), int):
            return config[key]
    idx = [ln.index for n in names if (ln := layer_name(n)) is not None]
    return max(idx) + 1 if idx else 0


def is_post_weight(name: str) -> bool:
    """Non-layer tensors that come after the layers (final norm, LM head, pooler, heads)."""
    return layer_name(name) is None and _POST.search(name) is not None


def tied_embedding_name(names: Iterable[str]) -> str | None:
    """The input-embedding tensor that an absent ``lm_head.weight`` is tied to."""
    for n in names:
        if _EMBED.search(n):
            return n
    return None
