from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from .. import sparsify as sp
from ..registry import PerModel, merge_method
from ._params import Density, Lambda, Weight
from ._task_vectors import combine_task_vectors

_REF = "Davari & Belilovsky 2023, Model Breadcrumbs, arXiv:2312.06795"
_SPACE = {"lambda": [0.5, 1.0], "density": [0.3, 0.7]}
Gamma = PerModel[Annotated[float, Field(ge=0, lt=1)]]


@merge_method("breadcrumbs", reference=_REF, search_space=_SPACE)
def breadcrumbs(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Weight = 1.0,
    density: Density = 0.9,
    gamma: Gamma = 0.01,
    lambda_: Lambda = 1.0,
    normalize: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Drop the largest ``gamma`` fraction (outliers) and the smallest entries of each task
    vector, keeping ``density``; add the weighted sum to the base."""
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        sparsify=lambda d, i: sp.magnitude_outliers(d, density[i], gamma[i]),
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
    )


@merge_method("breadcrumbs_ties", reference=_REF, search_space=_SPACE)
def breadcrumbs_ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Weight = 1.0,
    density: Density = 0.9,
    gamma: Gamma = 0.01,
    lambda_: Lambda = 1.0,
    normalize: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Breadcrumbs sparsification followed by TIES sign election and disjoint merge."""
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        sparsify=lambda d, i: sp.magnitude_outliers(d, density[i], gamma[i]),
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )
