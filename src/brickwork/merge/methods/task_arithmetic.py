from __future__ import annotations

import torch

from ..registry import merge_method
from ._params import Lambda, Weight
from ._task_vectors import combine_task_vectors


@merge_method(
    "task_arithmetic",
    reference="Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089",
    search_space={"lambda": [0.3, 0.5, 0.7, 1.0]},
)
def task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Weight = 1.0,
    lambda_: Lambda = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """Add the weighted sum of task vectors to the base: θ_base + λ Σ w_i (θ_i − θ_base)."""
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        sparsify=None,
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
    )
