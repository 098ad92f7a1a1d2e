"""RAM and RAM+ (tensor-local): Reinforced Agent Merging (arXiv:2601.13572), as mergekit
merges task vectors with them: shared changes averaged, unique ones kept (RAM+: amplified)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ..registry import merge_method

_REF = "Reinforced Agent Merging (RAM), arXiv:2601.13572; mergekit 0.1.5 merge_methods/ram.py"
Epsilon = Annotated[float, Field(ge=0)]


def _contributions(
    tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat task vectors with entries of |τ| ≤ ε zeroed, which entries each model changes,
    how many models change each entry, and whether more than one / exactly one does."""
    deltas = torch.stack([t - base for t in tensors]).reshape(len(tensors), -1)  # (models, n)
    changed = deltas.abs() > epsilon  # (models, n)
    count = changed.sum(dim=0, keepdim=True)  # (1, n) int64
    return deltas * changed, changed, count, count > 1, count == 1


@merge_method("ram", reference=_REF, search_space={"epsilon": [1e-5, 1e-4, 1e-3]})
def ram(
    tensors: list[torch.Tensor], base: torch.Tensor, *, epsilon: Epsilon = 1e-5
) -> torch.Tensor:
    """An entry changed (|τ_i| > ``epsilon``) by one model keeps that model's change; one
    changed by several gets the mean of their changes; the rest keep the base. Computed in
    the compute dtype in mergekit's order of operations."""
    tau, _, count, shared, unique = _contributions(tensors, base, epsilon)
    merged = (tau * unique + tau * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@merge_method(
    "ramplus_tl",
    reference=_REF.replace("ram.py", "ram.py (ramplus_tl)"),
    search_space={"r": [0.1, 0.5], "alpha": [0.2, 0.5]},
)
def ramplus_tl(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    r: Annotated[float, Field(ge=0)] = 0.1,
    alpha: Annotated[float, Field(ge=0)] = 0.2,
    epsilon: Annotated[float, Field(gt=0)] = 1e-5,
) -> torch.Tensor:
    """RAM with each model's unique changes scaled by λ_i = 1 + r · clamp(ρ_i, 0, α), where
    ρ_i = (entries model i shares with others) / (entries only it changes, clamped at
    ``epsilon``, which must be > 0 here: mergekit divides 0 by 0 and writes NaN), counted per
    tensor ("tensor-local"). The scale is float32, so with a bfloat16 compute dtype the sum
    is float32 (rounded to the output dtype when written), as in mergekit."""
    tau, changed, count, shared, unique = _contributions(tensors, base, epsilon)
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
    scale = 1 + r * rho.clamp(min=0, max=alpha)  # (models,)
    merged = (tau * unique * scale.unsqueeze(-1) + tau * shared / count.clamp(min=1)).sum(
        dim=0, keepdim=True
    )
    return base + merged.reshape_as(base)
