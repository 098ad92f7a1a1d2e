"""merge: combine checkpoints of one architecture into one, streaming, one tensor at a time."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {
    "merge": "api",
    "merge_state_dicts": "api",
    "merge_modules": "api",
    "merge_recipe_in_memory": "api",
    "MergeMethod": "registry",
    "PerModel": "registry",
    "get_method": "registry",
    "list_methods": "registry",
    "merge_method": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(
    name: str,
) -> Any:  # lazy, so `brickwork.recipe` and `brickwork.merge` import in any order
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """``brickwork.merge`` is both this package and the documented function
    ``brickwork.merge(recipe, out)``: importing the package binds it as the attribute
    ``merge`` of ``brickwork``, which would otherwise shadow the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .api import merge

        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
