from __future__ import annotations

import torch

from .. import sparsify as sp
from ..registry import merge_method
from ._params import Density, Lambda, Weight
from ._task_vectors import combine_task_vectors


@merge_method(
    "ties",
    reference="Yadav et al. 2023, TIES-Merging, arXiv:2306.01708",
    search_space={"lambda": [0.7, 1.0, 1.3], "density": [0.2, 0.5]},
)
def ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Weight = 1.0,
    density: Density = 1.0,
    lambda_: Lambda = 1.0,
    normalize: bool = True,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Trim each task vector to its top-``density`` magnitudes, elect a sign per entry, and
    average the agreeing entries (disjoint mean). ``int8_mask`` is accepted for mergekit
    recipes and changes nothing (masks are exact booleans here)."""
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        sparsify=lambda d, i: sp.magnitude(d, density[i]),
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )
