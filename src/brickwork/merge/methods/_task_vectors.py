"""The shared core of the task-vector family (task arithmetic, TIES, DARE, Breadcrumbs, DELLA)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..sparsify import sign_consensus

Sparsifier = Callable[[torch.Tensor, int], torch.Tensor]  # (delta, model index) -> delta


def combine_task_vectors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    sparsify: Sparsifier | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """``base + λ · Σ_i w_i m_i s(τ_i) / Σ_i w_i m_i`` (the division only when ``normalize``).

    τ_i = θ_i − θ_base; s: sparsification; m_i: sign-consensus mask (1 without consensus).
    """
    if not tensors:
        return base.clone()
    deltas = base.new_empty((len(tensors), *base.shape))  # (models, *shape)
    for i, t in enumerate(tensors):  # filled in place: no stacked temporaries
        torch.sub(t, base, out=deltas[i])
        if sparsify is not None:
            deltas[i] = sparsify(deltas[i], i)
    w = torch.tensor(list(weight), dtype=deltas.dtype, device=deltas.device).reshape(
        -1, *([1] * base.ndim)
    )  # (models, 1, ...)
    deltas.mul_(w)
    if consensus:
        mask = sign_consensus(deltas).to(deltas.dtype)
        mixed = deltas.mul_(mask).sum(dim=0)  # in place: no (models, ...) temporaries
        divisor = mask.mul_(w).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return mixed.add_(base)  # base + mixed, in place: no fresh output tensor
