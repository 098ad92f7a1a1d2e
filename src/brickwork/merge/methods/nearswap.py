"""NearSwap: mergekit's interpolation that takes the other model's value only where it is
near the base's (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ...errors import MergeComputationError
from ..registry import merge_method


@merge_method(
    "nearswap",
    reference="alchemonaut 2024, NearSwap (QuartetAnemoi-70B); mergekit 0.1.5 merge_methods/nearswap.py",
    search_space={"t": [0.0001, 0.001, 0.01]},
    n_models=(1, 1),
)
def nearswap(
    tensors: list[torch.Tensor], base: torch.Tensor, *, t: Annotated[float, Field(ge=0)]
) -> torch.Tensor:
    """Per entry, lerp from the base a to the other model b with weight
    clamp(t / max(|a − b|, 1e-6), 0, 1): entries closer than ``t`` become b, farther ones move
    towards b by t / |a − b|. ``t`` (a distance in weight units) has no default, as in
    mergekit. Computed in the compute dtype in mergekit's order of operations."""
    if len(tensors) != 1:
        raise MergeComputationError(
            f"nearswap merges the base with exactly one other model; got {len(tensors)}."
        )
    b = tensors[0]
    w = (t / (base - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * base
