"""Alignment: permute one model's hidden units onto another's before merging them.

``brickwork.align(model_a, model_b, method="weight" | "activation", data=...)`` returns B with
its units reordered onto A's and the permutations (Git Re-Basin, Ainsworth et al. 2023,
arXiv:2209.04836). Specs are derived, not written: by a torch.fx trace for plain PyTorch
modules (:func:`permutation_spec`), from the config and tensor names for Hugging Face
transformers (:mod:`brickwork.align.hf_spec`). Model files: ``brickwork align A B OUT`` and a
merge recipe's ``align:`` block (:mod:`brickwork.align.files`).

This package shares its name with the function ``brickwork.align``: importing any of its
submodules makes Python bind ``brickwork.align`` to the package, so the package is callable
and forwards to :func:`brickwork.align.api.align`. Its names are imported lazily, so that
``brickwork --help`` (which imports :mod:`brickwork.align.cli`) does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# public name -> module that defines it (imported on first use)
_EXPORTS = {
    "align": "brickwork.align.api",
    "PermutationGroup": "brickwork.align.spec",
    "PermutationSpec": "brickwork.align.spec",
    "Member": "brickwork.align.spec",
    "apply_permutations": "brickwork.align.spec",
    "permutation_spec": "brickwork.align.spec",
    "hf_permutation_spec": "brickwork.align.hf_spec",
    "weight_matching_streamed": "brickwork.align.streamed",
    "repair": "brickwork.align.repair",
    "reset_bn_stats": "brickwork.align.repair",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'brickwork.align' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from brickwork.align.api import align

        return align(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
