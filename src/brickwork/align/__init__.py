"""Alignment: permute one model's hidden units onto another's before merging them.

``brickwork.align(model_a, model_b, method="weight" | "activation", data=...)`` returns B with
its units reordered onto A's and the permutations. First step of issue 11: feed-forward
networks (Linear, BatchNorm1d, LayerNorm, element-wise activations), Git Re-Basin weight and
activation matching (Ainsworth et al. 2023, arXiv:2209.04836).

This package shares its name with the function ``brickwork.align``: importing any of its
submodules makes Python bind ``brickwork.align`` to the package, so the package is callable
and forwards to :func:`brickwork.align.api.align`.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from brickwork.align.api import align
from brickwork.align.spec import (
    PermutationGroup,
    PermutationSpec,
    apply_permutations,
    permutation_spec,
)

__all__ = [
    "PermutationGroup",
    "PermutationSpec",
    "align",
    "apply_permutations",
    "permutation_spec",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return align(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
