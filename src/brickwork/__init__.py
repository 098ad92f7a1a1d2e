"""brickwork: take trained networks apart into modules and build new networks from them.

The public API (everything else is private to its package)::

    brickwork.merge(recipe, out)                 # files -> model directory (streaming)
    brickwork.merge_state_dicts(method, models)  # in memory
    brickwork.merge_modules(method, modules)
    brickwork.merge_modules("regmean", modules, data=[batches_0, batches_1])  # data-aware
    brickwork.statistics_for(module, batches, "gram" | "fisher")  # cached statistics
    brickwork.list_methods(), brickwork.get_method(name)
    brickwork.open_checkpoint(path_or_state_dict)
    brickwork.load_recipe(path), brickwork.parse_recipe(dict)
    brickwork.BrickworkError (and subclasses in brickwork.errors)
    brickwork.moefy(model, n_experts=, top_k=, calibration=)  # MoEfication, in memory
    brickwork.save_moe(model, out), brickwork.load(path, base=None)  # brickwork MoE format
    brickwork.align(model_a, model_b, method="weight" | "activation", data=None)  # -> (B', perms)

Heavy modules are imported on first use, so ``import brickwork`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "merge": "brickwork.merge.api",
    "merge_state_dicts": "brickwork.merge.api",
    "merge_modules": "brickwork.merge.api",
    "merge_recipe_in_memory": "brickwork.merge.api",
    "run_search": "brickwork.search.runner",
    "statistics_for": "brickwork.stats",
    "list_methods": "brickwork.merge.registry",
    "get_method": "brickwork.merge.registry",
    "merge_method": "brickwork.merge.registry",
    "PerModel": "brickwork.merge.registry",
    "open_checkpoint": "brickwork.checkpoint.reader",
    "load_recipe": "brickwork.recipe",
    "parse_recipe": "brickwork.recipe",
    "MergeRecipe": "brickwork.recipe",
    "BrickworkError": "brickwork.errors",
    "MoELayer": "brickwork.route.moe",
    "load_balancing_loss": "brickwork.route.moe",
    "upcycle_to_mixtral": "brickwork.route.upcycle",
    "upcycle_moe": "brickwork.route.upcycle",
    "upcycle_from_recipe": "brickwork.route.recipe",
    "upcycle_module": "brickwork.route.upcycle_modules",
    "load": "brickwork.route.format",
    "save_moe": "brickwork.route.format",
    "moefy": "brickwork.route.moefy",
    "align": "brickwork.align.api",
}
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'brickwork' has no attribute {name!r}")
