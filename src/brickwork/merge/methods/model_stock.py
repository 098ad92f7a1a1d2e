from __future__ import annotations

import torch

from ...errors import MergeComputationError
from ..registry import merge_method


@merge_method("model_stock", reference="Jang et al. 2024, Model Stock, arXiv:2403.19522")
def model_stock(
    tensors: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool = False
) -> torch.Tensor:
    """Interpolate between the fine-tunes' average and the base with the ratio
    t = N·cosθ / (1 + (N−1)·cosθ), cosθ the mean pairwise cosine of the task vectors
    (per output row when ``filter_wise``)."""
    n = len(tensors)
    if n < 2:
        raise MergeComputationError(
            f"model_stock needs at least two fine-tuned models besides the base; got {n}."
        )
    rows = (
        (lambda x: x.reshape(x.shape[0], -1))
        if filter_wise and base.ndim > 1
        else (lambda x: x.reshape(1, -1))
    )
    deltas = [rows(t - base) for t in tensors]  # each (rows, features)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            cos.append(torch.nn.functional.cosine_similarity(deltas[i], deltas[j], dim=1, eps=1e-8))
    c = torch.stack(cos).mean(dim=0).clamp(min=0)  # (rows,)
    ratio = n * c / (1 + (n - 1) * c)
    ratio = (
        ratio.reshape(-1, *([1] * (base.ndim - 1)))
        if filter_wise and base.ndim > 1
        else ratio.reshape(())
    )
    avg = torch.stack(tensors).mean(dim=0)
    return ratio * avg + (1 - ratio) * base
