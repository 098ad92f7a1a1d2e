from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from .. import sparsify as sp
from ..registry import PerModel, merge_method
from ._params import Density, Lambda, Weight
from ._task_vectors import combine_task_vectors

_REF = "Deep et al. 2024, DELLA-Merging, arXiv:2406.11617"
_SPACE = {"lambda": [0.5, 1.0], "density": [0.3, 0.7]}
Epsilon = PerModel[Annotated[float, Field(ge=0, lt=1)]]


@merge_method("della", reference=_REF, search_space=_SPACE)
def della(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    generator: torch.Generator,
    weight: Weight = 1.0,
    density: Density = 0.7,
    epsilon: Epsilon = 0.15,
    lambda_: Lambda = 1.0,
    rescale: bool = True,
    normalize: bool = True,
    int8_mask: bool = False,
) -> torch.Tensor:
    """MagPrune (magnitude-ranked stochastic drop, rescaled), TIES sign election, disjoint merge."""
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        sparsify=lambda d, i: sp.magprune(
            d, density[i], epsilon[i], rescale=rescale, generator=generator
        ),
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


@merge_method("della_linear", reference=_REF, search_space=_SPACE)
def della_linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    generator: torch.Generator,
    weight: Weight = 1.0,
    density: Density = 0.7,
    epsilon: Epsilon = 0.15,
    lambda_: Lambda = 1.0,
    rescale: bool = True,
    normalize: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    """MagPrune sparsification, then the weighted sum of task vectors added to the base."""
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        sparsify=lambda d, i: sp.magprune(
            d, density[i], epsilon[i], rescale=rescale, generator=generator
        ),
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
    )
