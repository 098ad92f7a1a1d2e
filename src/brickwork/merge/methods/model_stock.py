from __future__ import annotations

import torch

from ...errors import MergeComputationError
from ..registry import merge_method


@merge_method("model_stock", reference="Jang et al. 2024, Model Stock, arXiv:2403.19522")
def model_stock(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    filter_wise: bool = False,
    clamp_cosine: bool = False,
) -> torch.Tensor:
    """Interpolate between the fine-tunes' average and the base with the ratio
    t = N·cosθ / (1 + (N−1)·cosθ), cosθ the mean pairwise cosine of the task vectors
    (per output row when ``filter_wise``); where 1 + (N−1)·cosθ is within 1e-6 of 0, t = 0.
    Computed in the compute dtype in mergekit's order of operations, so mergekit recipes get
    mergekit's tensors.

    ``clamp_cosine`` clamps a negative cosθ to 0, so t stays in [0, 1] (the tensor keeps the
    base instead of moving away from the fine-tunes' average). Off by default, as in the paper
    and mergekit: on brickwork's bench it changed nothing or was slightly worse (text suite,
    8 tasks: 58.46 % average either way, 2 of 32 tensors with cosθ < 0; filter-wise, 1753 of
    6912 rows with cosθ < 0: 58.55 % clamped vs 58.72 % not; digits: no negative cosθ;
    benchmarks/README.md, "model_stock: clamp_cosine").
    """
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
            a, b = deltas[i], deltas[j]
            norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
            cos.append(((a * b).sum(dim=1) / norms.clamp(min=1e-6)).clamp(-1, 1))  # (rows,)
    c = torch.stack(cos).mean(dim=0)  # (rows,)
    if clamp_cosine:
        c = c.clamp(min=0)
    denominator = 1 + (n - 1) * c
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base
    ratio = torch.where(singular, 0, n * c / torch.where(singular, 1, denominator))
    ratio = ratio.reshape(-1, *([1] * (base.ndim - 1))) if filter_wise and base.ndim > 1 else ratio
    avg = tensors[0]
    for t in tensors[1:]:
        avg = avg + t  # summed in order, as mergekit
    avg = avg / n
    return (ratio * avg + (1 - ratio) * base).reshape(base.shape)
