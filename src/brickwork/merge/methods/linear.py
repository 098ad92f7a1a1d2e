from __future__ import annotations

import torch

from ..registry import merge_method
from ._params import Weight


@merge_method("linear", reference="Wortsman et al. 2022, Model soups, arXiv:2203.05482")
def linear(
    tensors: list[torch.Tensor], *, weight: Weight = 1.0, normalize: bool = True
) -> torch.Tensor:
    """Weighted average of the models: Σ w_i θ_i / Σ w_i (plain sum when not normalized)."""
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weight):
        out.addcmul_(t, torch.tensor(w, dtype=t.dtype))
    if normalize:
        out.div_(sum(weight))
    return out
