"""Arcee Fusion: Arcee AI's merge of one model into a base that keeps only the changes of
outstanding importance (mergekit's ``arcee_fusion``, https://arcee.ai)."""

from __future__ import annotations

import torch

from ...errors import MergeComputationError
from ..registry import merge_method


def _kth_smallest(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x's values at the sorted positions ⌊q · (n − 1)⌋ (q float32, as mergekit indexes)."""
    idx = (q * (x.numel() - 1)).long()
    return torch.stack([torch.kthvalue(x, int(i) + 1).values for i in idx])


@merge_method(
    "arcee_fusion",
    reference="Arcee AI 2025, Arcee Fusion (arcee.ai); mergekit 0.1.5 merge_methods/arcee_fusion.py",
    n_models=(1, 1),
)
def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Importance of each entry of the other model θ against the base β:
    |θ − β| · KL(softmax(θ) ‖ softmax(β)) (softmax and KL along the last axis, 1e-8 added to
    both distributions); the change θ − β is kept where the importance reaches
    median + 1.5 · (q₃ − q₁) of the tensor's importances, else the base is kept. Computed in
    the compute dtype in mergekit's order of operations; the mask is float32, as in mergekit.

    Quantiles are exact (the value at sorted position ⌊q·(n−1)⌋). mergekit takes them from a
    random sample of 1,000,000 entries (unseeded) for larger tensors, so there its output is
    random and differs from this one."""
    if len(tensors) != 1:
        raise MergeComputationError(
            f"arcee_fusion merges the base with exactly one other model; got {len(tensors)}."
        )
    theta = tensors[0]
    p = torch.softmax(theta, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)  # (..., 1)
    importance = (theta - base).abs() * kl
    del p, q, kl
    q1, median, q3 = _kth_smallest(importance.reshape(-1), torch.tensor([0.25, 0.5, 0.75]))
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (theta - base) * mask
