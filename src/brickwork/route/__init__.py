"""route: mixture-of-experts layers, upcycling dense fine-tunes into MoE checkpoints,
MoEfication (one dense model's FFNs split into experts) and brickwork's own MoE format.

Exports are imported on first use, so ``brickwork route --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FFN": "brickwork.route.moe",
    "MoELayer": "brickwork.route.moe",
    "MoEOutput": "brickwork.route.moe",
    "load_balancing_loss": "brickwork.route.moe",
    "MoEBlock": "brickwork.route.moe",
    "sequence_mask": "brickwork.route.moe",
    "save_moe": "brickwork.route.format",
    "load": "brickwork.route.format",
    "moefy": "brickwork.route.moefy",
    "FFNSpec": "brickwork.route.ffn",
    "find_ffns": "brickwork.route.ffn",
    "balanced_kmeans": "brickwork.route.cluster",
    "upcycle_to_mixtral": "brickwork.route.upcycle",
    "upcycle_moe": "brickwork.route.upcycle",
    "upcycle_from_recipe": "brickwork.route.recipe",
    "RouterData": "brickwork.route.routers",
    "upcycle_module": "brickwork.route.upcycle_modules",
    "upcycle_hf_models": "brickwork.route.upcycle_modules",
    "UpcycleRecipe": "brickwork.route.recipe",
    "load_upcycle_recipe": "brickwork.route.recipe",
    "parse_upcycle_recipe": "brickwork.route.recipe",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'brickwork.route' has no attribute {name!r}")
