from __future__ import annotations

import torch

from ...errors import MergeComputationError
from ..registry import merge_method


@merge_method("passthrough", reference="mergekit passthrough (layer stacking / frankenmerges)")
def passthrough(tensors: list[torch.Tensor], *, scale: float = 1.0) -> torch.Tensor:
    """Copy the single input tensor unchanged (times ``scale``). Used with ``slices:`` recipes
    to stack layers of different models."""
    if len(tensors) != 1:
        raise MergeComputationError(
            f"passthrough copies one model's tensor; got {len(tensors)} models for this tensor. "
            "Give one model per slice, or use a merging method."
        )
    return tensors[0] * scale if scale != 1.0 else tensors[0]
