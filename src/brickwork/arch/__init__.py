"""What a model's parts are, read from tensor names and HF configs."""

from .names import LayerName, is_post_weight, layer_name, num_layers, tied_embedding_name

__all__ = ["LayerName", "layer_name", "num_layers", "is_post_weight", "tied_embedding_name"]
