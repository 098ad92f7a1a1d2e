"""What a model's parts are, read from tensor names and HF configs."""

from .names import LayerName, is_post_weight, layer_name, num_layers, tied_embedding_name
from .transformer import SUPPORTED_MODEL_TYPES, LayerParts, TransformerLayout, transformer_layout

__all__ = [
    "LayerName",
    "layer_name",
    "num_layers",
    "is_post_weight",
    "tied_embedding_name",
    "SUPPORTED_MODEL_TYPES",
    "LayerParts",
    "TransformerLayout",
    "transformer_layout",
]
