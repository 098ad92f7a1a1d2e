"""Search: find merge recipes by evaluation, on Ray, resumable (issue 13).

``brickwork search CONFIG OUT`` / :func:`run_search`. Names are imported lazily so that
``brickwork --help`` does not import torch or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "SearchConfig": "brickwork.search.config",
    "parse_search_config": "brickwork.search.config",
    "load_search_config": "brickwork.search.config",
    "Genome": "brickwork.search.genome",
    "make_optimizer": "brickwork.search.optimizers",
    "Evaluator": "brickwork.search.evaluators",
    "make_evaluator": "brickwork.search.evaluators",
    "run_search": "brickwork.search.runner",
    "SearchResult": "brickwork.search.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'brickwork.search' has no attribute '{name}'")
