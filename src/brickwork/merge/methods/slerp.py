from __future__ import annotations

import torch

from ...errors import MergeComputationError
from ..registry import merge_method
from ._params import Fraction


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
    """
    a, b = v0.reshape(-1), v1.reshape(-1)  # (n,)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = torch.dot(a / na, b / nb).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s) * v0 + (torch.sin(t * theta) / s) * v1


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
