"""Compress: take one network apart into fewer or smaller pieces (issue 12).

LoRA extraction (``brickwork compress lora``), low-rank factorisation (``compress lowrank``),
pruning (``compress prune``) and lottery tickets. Names are imported lazily so that
``brickwork --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it (filled in as the parts land)
_EXPORTS: dict[str, str] = {}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'brickwork.compress' has no attribute '{name}'")
