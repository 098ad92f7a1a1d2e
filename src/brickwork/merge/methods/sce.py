"""SCE: Select, Calculate, Erase (Wan et al. 2024, FuseChat, arXiv:2408.07990), as mergekit
merges task vectors with it."""

from __future__ import annotations

import torch

from ..registry import merge_method
from ..sparsify import sign_consensus
from ._params import Fraction


def _select(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask (one per entry, shared by the models) of the ``fraction`` of entries whose task
    vectors vary most across the models: the top int(fraction · #entries with variance ≠ 0)
    by variance (population variance over the models)."""
    var = torch.var(deltas, dim=0, unbiased=False)  # (*shape)
    k = int(torch.count_nonzero(var) * fraction)  # a float32 product, as mergekit rounds it
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


@merge_method(
    "sce",
    reference="Wan et al. 2024, FuseChat, arXiv:2408.07990; mergekit 0.1.5 merge_methods/sce.py",
    search_space={"select_topk": [0.1, 0.3, 0.6, 1.0]},
)
def sce(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    select_topk: Fraction = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Task vectors τ_i: **select** the ``select_topk`` fraction of entries with the largest
    variance across the models (all when 1; none when 0), **calculate** each model's weight
    as its mean squared (selected) task vector over their sum (equal weights when the sum is
    below 1e-6), **erase** entries whose sign disagrees with the elected (summed) sign, and
    add the weighted mean of the survivors to the base (divisor clamped at 1e-6). Computed in
    the compute dtype in mergekit's order of operations; ``int8_mask`` is accepted for
    mergekit recipes and changes nothing."""
    deltas = torch.stack([t - base for t in tensors])  # (models, *shape)
    if select_topk < 1:
        deltas = deltas * _select(deltas, select_topk).unsqueeze(0)
    agree = sign_consensus(deltas)  # (models, *shape) bool
    energy = deltas.square().reshape(len(tensors), -1).mean(dim=1)  # (models,)
    total = torch.sum(energy).item()
    w = torch.ones_like(energy) / len(tensors) if abs(total) < 1e-6 else energy / total
    w = w.reshape(-1, *([1] * base.ndim))  # (models, 1, ...)
    kept = w * agree  # (models, *shape)
    return base + (deltas * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)
