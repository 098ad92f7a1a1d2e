from __future__ import annotations

import torch

from ...errors import MergeComputationError
from ..registry import merge_method
from ._params import Fraction

# Elements per chunk of the reductions: mergekit's value, so that norms and the dot product
# are summed in the same order and outputs agree bit for bit; it also bounds scratch memory.
_CHUNK = 1024 * 1024


def slerp_pair(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Spherical interpolation of two tensors seen as flat vectors (Shoemake 1985).

    The angle comes from the normalised vectors; the interpolation weights
    sin((1−t)Ω)/sin Ω and sin(tΩ)/sin Ω are applied to the original (unnormalised)
    tensors. Nearly collinear pairs (|cos Ω| > ``dot_threshold``) fall back to lerp.
    Computed in float32 (float64 for float64 inputs), in chunks of ``_CHUNK`` elements;
    returned in the inputs' dtype (as mergekit).
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)  # (1, n)
    tt = torch.tensor([[t]], dtype=dtype, device=v0.device)  # (1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    spans = [(i, i + _CHUNK) for i in range(0, a.shape[1], _CHUNK)]

    def norm(x: torch.Tensor) -> torch.Tensor:  # (1, 1): norm of the chunks' norms
        parts = [
            torch.linalg.vector_norm(x[:, i:j].to(dtype), dim=1, keepdim=True) for i, j in spans
        ]
        n = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(n > eps, n, 1)

    na, nb = norm(a), norm(b)
    parts = [
        ((a[:, i:j].to(dtype) / na) * (b[:, i:j].to(dtype) / nb)).sum(dim=1, keepdim=True)
        for i, j in spans
    ]
    dot = torch.stack(parts).sum(dim=0).clamp(-1, 1)  # (1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    s = torch.sin(theta)
    ca = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / s)
    cb = torch.where(linear, tt, torch.sin(tt * theta) / s)
    out = torch.empty(a.shape, dtype=v0.dtype, device=v0.device)  # (1, n)
    for i, j in spans:
        out[:, i:j] = ca * a[:, i:j].to(dtype) + cb * b[:, i:j].to(dtype)
    return out.reshape(v0.shape)


@merge_method(
    "slerp",
    reference="Shoemake 1985, Animating rotation with quaternion curves; mergekit's slerp",
    search_space={"t": [0.3, 0.5, 0.7]},
)
def slerp(tensors: list[torch.Tensor], base: torch.Tensor, *, t: Fraction = 0.5) -> torch.Tensor:
    """Spherical interpolation from the base (t=0) to the one other model (t=1)."""
    if len(tensors) != 1:
        raise MergeComputationError(
            f"slerp interpolates exactly two models (the base and one other); got the base and "
            f"{len(tensors)} others. Use multislerp or karcher for more."
        )
    return slerp_pair(t, base, tensors[0])
