from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from ..registry import merge_method
from ._params import Lambda
from ._subspace import finish, stacked_task_vectors


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to [0, 1] by its minimum and maximum (a constant row becomes 0)."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    return (x - lo) / torch.where(span > 0, span, 1)


def kth_smallest(x: torch.Tensor, index: int) -> torch.Tensor:
    """The value at 0-based position ``index`` of each row sorted ascending: ``(rows, 1)``."""
    index = min(max(index, 0), x.shape[1] - 1)
    return torch.kthvalue(x, index + 1, dim=1, keepdim=True).values


@merge_method(
    "pcb",
    reference=(
        "Du et al. 2024, Parameter Competition Balancing for Model Merging (NeurIPS 2024), "
        "arXiv:2410.02396"
    ),
    search_space={"pcb_ratio": [0.05, 0.1], "lambda": [1.0, 1.3]},
)
def pcb(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    pcb_ratio: Annotated[float, Field(gt=0, le=1)] = 0.1,
    lambda_: Lambda = 1.0,
    clip_ratio: Annotated[float, Field(ge=0, lt=0.5)] = 1e-4,
) -> torch.Tensor:
    """PCB-Merging: weight every task-vector entry by how much it matters to its own task
    (intra-balancing) and how much the other tasks agree with it (inter-balancing), drop all
    but the top ``pcb_ratio`` of each task's weights, and take the weighted mean.

    With τ_i the task vectors (N of them) flattened to d entries, as in the authors' code:
    clip |τ_i| to its ``clip_ratio`` and 1 − ``clip_ratio`` quantiles (outliers; sign kept:
    τ̃_i); intra-balancing β_intra,i = exp(N · Norm(|τ̃_i|)²), the unnormalised softmax over
    the d entries with temperature N (Norm: min-max over the d entries); inter-balancing
    β_inter,i = tanh(τ_i ⊙ Σ_j τ_j); PCB matrix β_i = β_intra,i ⊙ β_inter,i. Drop: k =
    ⌈d·pcb_ratio⌉ entries are kept: β_i is raised to its largest dropped value (the (k+1)-th
    largest) and min-max normalised, so the k entries above it keep a weight w_i > 0 (a
    softmax's denominator would cancel here, so the softmax need not be taken). Rescale:
    θ_base + λ Σ_i w_i τ̃_i / Σ_i w_i (an entry no task keeps stays at the base). The authors'
    code has pcb_ratio 0.1 by default; their evolutionary-search script uses 0.05 and searches
    per-task λ in [0.8, 1.3] on validation data. Here λ = 1 by default, one global λ.

    Every tensor gets this rule, 1-D (biases, norms) and embeddings alike. The paper
    normalises and takes quantiles over the whole flattened model; here that is done per
    tensor (the streaming model), so the drop keeps the top ``pcb_ratio`` of every tensor.
    c = ⌊d·clip_ratio⌋ entries are clipped at each end (the authors' code clips at sorted
    position ⌊d(1 − clip_ratio)⌋ − 1, which on tensors with fewer than 1/clip_ratio entries
    clips the largest to the second largest), and the drop keeps ⌈d·pcb_ratio⌉ entries (the
    code keeps d − 1 − ⌊d(1 − pcb_ratio)⌋, one fewer). With one model, or identical
    fine-tunes, the result is θ_base + λ τ̃ on the ⌈d·pcb_ratio⌉ entries of largest magnitude
    and the base elsewhere. Where nothing is dropped (⌈d·pcb_ratio⌉ = d: ``pcb_ratio`` 1, or a
    one-entry tensor) every weight is 1 and the result is θ_base + λ·mean_i τ̃_i. Zero task
    vectors give the base.
    """
    taus = stacked_task_vectors(tensors, base)  # (N, *shape)
    n = taus.shape[0]
    flat = taus.reshape(n, -1)  # (N, d)
    d = flat.shape[1]
    if d == 0:
        return finish(taus.sum(dim=0), base)
    # In place where possible: besides the task vectors, about three (N, d) buffers live.
    mag = flat.abs()
    cut = math.floor(d * clip_ratio + 1e-9)  # entries clipped at each end
    mag.clamp_(min=kth_smallest(mag, cut), max=kth_smallest(mag, d - cut - 1))  # |τ̃|
    score = torch.tanh(flat * flat.sum(dim=0))  # β_inter: (N, d)
    score.mul_(min_max(mag).square_().mul_(n).exp_())  # ⊙ β_intra
    clipped = flat.sign_().mul_(mag)  # τ̃ (in the task vectors' buffer)
    del mag
    keep = math.ceil(d * pcb_ratio - 1e-9)  # entries kept per task
    if keep >= d:  # nothing to drop
        weight = score.fill_(1)
    else:
        floor = kth_smallest(score, d - keep - 1)  # the largest dropped score
        weight = min_max(score.clamp_(min=floor))  # (N, d): 0 for dropped entries
    merged = clipped.mul_(weight).sum(dim=0).div_(weight.sum(dim=0).clamp_(min=1e-12))  # (d,)
    return finish(lambda_ * merged.reshape(base.shape), base)
