from __future__ import annotations

import torch

from .. import sparsify as sp
from ..registry import merge_method
from ._params import Density, Lambda, Weight
from ._task_vectors import combine_task_vectors

_REF = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099"
_SPACE = {"lambda": [0.5, 1.0], "density": [0.3, 0.7]}


@merge_method("dare_linear", reference=_REF, search_space=_SPACE)
def dare_linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    generator: torch.Generator,
    weight: Weight = 1.0,
    density: Density = 1.0,
    lambda_: Lambda = 1.0,
    rescale: bool = True,
    normalize: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Randomly drop task-vector entries with probability 1−density, rescale by 1/density,
    then add the weighted sum to the base."""
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        sparsify=lambda d, i: sp.random_drop(d, density[i], rescale=rescale, generator=generator),
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
    )


@merge_method("dare_ties", reference=_REF, search_space=_SPACE)
def dare_ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    generator: torch.Generator,
    weight: Weight = 1.0,
    density: Density = 1.0,
    lambda_: Lambda = 1.0,
    rescale: bool = True,
    normalize: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    """DARE's random drop-and-rescale, then TIES sign election and disjoint merge."""
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        sparsify=lambda d, i: sp.random_drop(d, density[i], rescale=rescale, generator=generator),
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )
