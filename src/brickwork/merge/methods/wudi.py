from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ..registry import merge_method
from ._subspace import finish, is_matrix, stacked_task_vectors

_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as FusionBench runs it
_EPS = 1e-8


def interference_gradient_terms(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, B) such that the gradient of L(M) = Σ_i ‖(M − τ_i) τ_iᵀ‖² / ‖τ_i‖² is
    2·(M SᵀS − B): S stacks τ_i / ‖τ_i‖ (``(T·rows, cols)``), B = Σ_i τ_i τ_iᵀ τ_i / ‖τ_i‖².
    Zero task vectors add nothing (their term is 0 / 0 in the paper's formula)."""
    norms = torch.linalg.matrix_norm(taus).square()  # (T,) ‖τ_i‖_F²
    keep = norms > 0
    taus, norms = taus[keep], norms[keep]
    s = (taus / norms.sqrt()[:, None, None]).reshape(-1, taus.shape[-1])  # (T·rows, cols)
    rows, cols = taus.shape[-2:]
    # τ τᵀ τ through the smaller Gram matrix: (T, cols, cols) or (T, rows, rows)
    ttt = taus @ (taus.mT @ taus) if rows >= cols else (taus @ taus.mT) @ taus
    b = (ttt / norms[:, None, None]).sum(dim=0)  # (rows, cols)
    return s, b


@merge_method(
    "wudi",
    reference=(
        "Cheng et al. 2025, Whoever Started the Interference Should End It: Guiding Data-Free "
        "Model Merging via Task Vectors (ICML 2025), arXiv:2503.08099"
    ),
    search_space={"iterations": [100, 300]},
)
def wudi(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    iterations: Annotated[int, Field(ge=0, le=100_000)] = 100,
    lr: Annotated[float, Field(gt=0, le=1.0)] = 1e-5,
) -> torch.Tensor:
    """WUDI-Merging: for each matrix, minimise the interference that the merged task vector
    τ_m causes on each task's own directions, L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / ‖τ_i‖_F²,
    by Adam (lr ``lr``, betas (0.9, 0.999), ε = 1e-8), starting at Σ_i τ_i; return
    θ_base + τ_m (no scaling factor, as in the paper).

    FusionBench's implementation runs 300 Adam steps at lr 1e-5 (its config: 400); the
    default here is 100 steps, so a small model's matrices take seconds at most on a CPU (MiniLM's
    384×384 / 1536×384 / 384×1536 with 8 tasks: 0.5 / 1.6 / 3.1 s on one thread);
    ``iterations: 300`` gives FusionBench's. The gradient 2·Σ_i (τ_m − τ_i) τ_iᵀτ_i / ‖τ_i‖²
    is computed in closed form (no autograd), through the Gram matrix Σ_i τ_iᵀτ_i / ‖τ_i‖² or
    the stacked task vectors, whichever is cheaper. Adam's steps are at most about ``lr`` per
    entry, so the result stays near the sum; what it moves depends on the task vectors' scale.

    Only one tensor's task vectors are needed, so WUDI fits the streaming executor. Every
    tensor that is not 2-D (biases, norm weights, ≥3-D kernels) gets θ_base + mean_i τ_i, as
    in FusionBench's implementation; embeddings are 2-D and are optimised as matrices. With one
    model the loss is minimised at τ_m = τ, which is also the start: the result is the
    fine-tune (returned without steps: Adam would turn the rounding error of a zero gradient
    into steps of ``lr``).
    Identical fine-tunes start at T·τ and move towards τ. Zero task vectors give the base.
    """
    taus = stacked_task_vectors(tensors, base)  # (T, rows, cols)
    if not is_matrix(base):
        return finish(taus.mean(dim=0), base)
    merged = taus.sum(dim=0)  # (rows, cols)
    s, b = interference_gradient_terms(taus)
    if s.shape[0] <= merged.shape[0]:  # at most one non-zero task vector: L(Σ τ_i) = 0
        return finish(merged, base)
    cols = merged.shape[1]
    gram = s.T @ s if cols <= 2 * s.shape[0] else None  # (cols, cols), or None: use s
    m1 = torch.zeros_like(merged)
    m2 = torch.zeros_like(merged)
    beta1, beta2 = _BETAS
    for step in range(1, iterations + 1):
        ms = merged @ gram if gram is not None else (merged @ s.T) @ s  # M SᵀS
        grad = 2 * (ms - b)
        m1.mul_(beta1).add_(grad, alpha=1 - beta1)
        m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (m2.sqrt() / (1 - beta2**step) ** 0.5).add_(_EPS)
        merged.addcdiv_(m1, denom, value=-lr / (1 - beta1**step))
    return finish(merged, base)
