"""NuSLERP: mergekit's spherical interpolation of two models, optionally of their task
vectors (a base), row-wise, column-wise or over the whole tensor."""

from __future__ import annotations

import torch

from ...errors import MergeComputationError
from ..registry import merge_method
from ._params import Weight


def _nuslerp_pair(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int, flatten: bool
) -> torch.Tensor:
    """Slerp from ``v0`` (t=0) to ``v1`` (t=1) of vectors along ``dim`` (every entry as one
    vector when ``flatten``), in the inputs' dtype. Vectors are normalised with their norm
    clamped at 1e-7; where 1 − cos²Ω ≤ 1e-16 (collinear) it is lerp."""
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)  # (n,)
    elif dim != -1:
        a, b = v0.transpose(dim, -1), v1.transpose(dim, -1)  # vectors along the last axis
    else:
        a, b = v0, v1

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = (unit(a) * unit(b)).sum(dim=-1, keepdim=True).clamp(-1, 1)  # (..., 1)
    collinear = (1 - cos.square()) <= 1e-8**2
    omega = torch.acos(torch.where(collinear, 0, cos))
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    out = torch.where(collinear, (1 - t) * a + t * b, spherical)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@merge_method(
    "nuslerp",
    reference="mergekit's nuslerp (Arcee AI; mergekit 0.1.5 merge_methods/nuslerp.py)",
    search_space={"nuslerp_flatten": [True, False]},
    n_models=(2, 2),
)
def nuslerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Weight = 1.0,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> torch.Tensor:
    """Spherical interpolation of exactly two models at t = w₂ / (w₁ + w₂) (0.5 when the
    weights sum to within 1e-6 of 0); with a base, of their task vectors, added back to the
    base. ``nuslerp_flatten`` (default): the whole tensor is one vector; otherwise each row
    (``nuslerp_row_wise: false``, vectors along the last axis) or each column
    (``nuslerp_row_wise: true``, along the first axis) is interpolated on its own. Computed in
    the compute dtype in mergekit's order of operations. ``weight`` defaults to 1 (mergekit
    requires it)."""
    if len(tensors) != 2:
        raise MergeComputationError(
            f"nuslerp interpolates exactly two models besides the base; got {len(tensors)}."
        )
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dim = 0 if nuslerp_row_wise else -1
    if base is None:
        return _nuslerp_pair(t, tensors[0], tensors[1], dim=dim, flatten=nuslerp_flatten)
    delta = _nuslerp_pair(t, tensors[0] - base, tensors[1] - base, dim=dim, flatten=nuslerp_flatten)
    return base + delta
