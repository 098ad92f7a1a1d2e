"""Compress: take one network apart into fewer or smaller pieces (issue 12).

LoRA extraction (``brickwork compress lora``), low-rank factorisation (``compress lowrank``),
pruning (``compress prune``) and lottery tickets. Names are imported lazily so that
``brickwork --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it (filled in as the parts land)
_EXPORTS: dict[str, str] = {
    "Adapter": "brickwork.compress.adapters",
    "AdapterCheckpoint": "brickwork.compress.adapters",
    "MergedAdapter": "brickwork.compress.adapters",
    "merge_adapters": "brickwork.compress.adapters",
    "write_adapter": "brickwork.compress.adapters",
    "PruneResult": "brickwork.compress.prune",
    "magnitude_mask": "brickwork.compress.prune",
    "prune_model": "brickwork.compress.prune",
    "prune_module": "brickwork.compress.prune",
    "sparsegpt_prune": "brickwork.compress.prune",
    "wanda_mask": "brickwork.compress.prune",
    "prune_structured": "brickwork.compress.structured",
    "prune_groups": "brickwork.compress.structured",
    "load_structured": "brickwork.compress.structured_heads",
    "LowRankLinear": "brickwork.compress.lowrank",
    "factorize_model": "brickwork.compress.lowrank",
    "factorize_weight": "brickwork.compress.lowrank",
    "gram_statistics": "brickwork.compress.lowrank",
    "save_lowrank": "brickwork.compress.lowrank_format",
    "compress_lowrank": "brickwork.compress.lowrank_format",
    "factorize_conv": "brickwork.compress.conv",
    "extract_lora": "brickwork.compress.lora",
    "lora_factors": "brickwork.compress.lora",
    "Masks": "brickwork.compress.lottery",
    "MaskHandle": "brickwork.compress.lottery",
    "Ticket": "brickwork.compress.lottery",
    "find_ticket": "brickwork.compress.lottery",
    "magnitude_masks": "brickwork.compress.lottery",
    "mask_optimizer": "brickwork.compress.lottery",
    "prunable_parameters": "brickwork.compress.lottery",
    "random_masks": "brickwork.compress.lottery",
    "reinitialized": "brickwork.compress.lottery",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'brickwork.compress' has no attribute '{name}'")
