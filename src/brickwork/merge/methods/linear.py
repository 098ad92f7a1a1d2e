from __future__ import annotations

import torch

from ...errors import MergeComputationError
from ..registry import merge_method
from ._params import Weight


@merge_method("linear", reference="Wortsman et al. 2022, Model soups, arXiv:2203.05482")
def linear(
    tensors: list[torch.Tensor], *, weight: Weight = 1.0, normalize: bool = True
) -> torch.Tensor:
    """Weighted average of the models: Σ w_i θ_i / Σ w_i (plain sum when not normalized).
    Accumulated in float32 (float64 for float64 inputs) whatever the compute dtype, as
    mergekit does; returned in the compute dtype."""
    if normalize and abs(sum(weight)) < 1e-12:
        raise MergeComputationError(
            f"linear: the weights {list(weight)} sum to 0, and normalize: true divides by "
            "their sum (mergekit writes inf / nan here). Give weights that do not sum to 0, "
            "or set normalize: false for a plain weighted sum."
        )
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(list(weight), dtype=dtype, device=first.device)  # (models,)
    out = torch.zeros(first.shape, dtype=dtype, device=first.device)
    for t, wi in zip(tensors, w):
        out.addcmul_(t, wi)
    if normalize:
        out.div_(w.sum())
    return out.to(first.dtype)
