"""Multi-SLERP: mergekit's barycentric interpolation of any number of models on a
hypersphere (C. Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ...errors import MergeComputationError
from ..registry import merge_method
from ._params import Weight


@merge_method(
    "multislerp",
    reference="Goddard 2025, Multi-SLERP (goddard.blog); mergekit 0.1.5 merge_methods/multislerp.py",
)
def multislerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Weight = 1.0,
    normalize_weights: bool = True,
    eps: Annotated[float, Field(ge=0)] = 1e-8,
) -> torch.Tensor:
    """Weighted spherical mean of the models (of their task vectors with a base): the unit
    vectors' weighted mean direction μ, the weighted tangent vectors at μ mapped back with one
    exponential-map step, scaled by the weighted mean norm. Each tensor is one vector.
    One model is returned as it is. Two opposite models whose weighted directions cancel
    fall back to their weighted sum; more that cancel are an error. Where every task vector
    is 0 (the models equal the base) the base is returned; mergekit raises there. ``normalize_weights``
    divides the weights by their sum. Computed in the compute dtype (the weights too) in
    mergekit's order of operations. ``weight`` defaults to 1 (mergekit requires it)."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors)  # (models, *shape)
    if base is not None:
        stacked = stacked - base
    vectors = stacked.reshape(len(tensors), -1)  # (models, n)
    w = torch.tensor(list(weight), dtype=vectors.dtype, device=vectors.device)  # (models,)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(vectors, dim=-1, keepdim=True)  # (models, 1)
    units = vectors / (norms + eps)
    mean = (units * w.reshape(-1, 1)).sum(dim=0)  # (n,)
    mean_norm = torch.norm(mean)
    if mean_norm < eps and not bool(vectors.any()):  # nothing moved: mergekit raises here
        return stacked[0] if base is None else stacked[0] + base
    if mean_norm < eps:
        if len(tensors) != 2:
            raise MergeComputationError(
                f"multislerp: the weighted mean direction of the {len(tensors)} models is 0 "
                f"(antipodal task vectors whose weights {list(weight)} cancel); give other "
                "weights."
            )
        out = (vectors[0] * w[0] + vectors[1] * w[1]).reshape(stacked.shape[1:])
        return out if base is None else out + base
    mu = mean / mean_norm
    tangents = units - (units * mu).sum(dim=-1, keepdim=True) * mu  # (models, n)
    step = (tangents * w.reshape(-1, 1)).sum(dim=0)  # (n,)
    length = torch.norm(step) + eps
    point = mu * torch.cos(length) + step * (torch.sin(length) / length)
    out = (point * (norms.squeeze(-1) * w).sum()).reshape(stacked.shape[1:])
    return out if base is None else out + base
