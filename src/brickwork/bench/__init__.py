"""Benchmark suites: real multi-task data, cached fine-tunes of a shared base, and every
registered merge method evaluated on them (``brickwork bench``).

Exports load on first use so that ``brickwork --help`` does not import torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"MissingDataError": ".data", "run_bench": ".runner", "run_lm_bench": ".lm"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
