from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ..registry import merge_method
from ._params import Weight


@merge_method(
    "karcher",
    reference="Karcher 1977, Riemannian center of mass; Buss & Fillmore 2001, spherical averages",
)
def karcher(
    tensors: list[torch.Tensor],
    *,
    weight: Weight = 1.0,
    max_iter: Annotated[int, Field(ge=1)] = 10,
    tol: Annotated[float, Field(gt=0)] = 1e-5,
) -> torch.Tensor:
    """N-model spherical mean: the weighted Karcher (Fréchet) mean of the directions on the
    unit sphere, scaled by the weighted mean norm. Two models with equal weights give slerp(½)."""
    w = torch.tensor(list(weight), dtype=torch.float64, device=tensors[0].device)
    w = w / w.sum()
    flat = [t.reshape(-1).to(torch.float64) for t in tensors]
    norms = torch.stack([torch.linalg.vector_norm(f) for f in flat])
    if len(tensors) == 1 or bool((norms < 1e-12).any()):
        return sum(wi * t for wi, t in zip(w.tolist(), tensors))  # degenerate: linear mean
    units = [f / n for f, n in zip(flat, norms)]
    mu = sum(wi * u for wi, u in zip(w, units))
    mu = mu / torch.linalg.vector_norm(mu)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mu)
        for wi, u in zip(w, units):
            cos = torch.dot(mu, u).clamp(-1, 1)
            theta = torch.acos(cos)
            if theta > 1e-12:
                tangent += wi * (theta / torch.sin(theta)) * (u - cos * mu)  # log map at mu
        step = torch.linalg.vector_norm(tangent)
        if step < tol:
            break
        mu = torch.cos(step) * mu + torch.sin(step) * tangent / step  # exp map
    scale = (w * norms).sum()
    return (mu * scale).reshape(tensors[0].shape).to(tensors[0].dtype)
