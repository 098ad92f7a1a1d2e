"""Isotropic merging (Marczak et al. 2025): Iso-C and Iso-CTS."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ..registry import merge_method
from ._params import Lambda
from ._subspace import finish, is_matrix, polar, stacked_task_vectors

_REF = (
    "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces (ICML 2025), arXiv:2502.04959"
)


@merge_method("iso_c", reference=_REF, search_space={"alpha": [1.0, 1.3, 1.6]})
def iso_c(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    alpha: Lambda = 1.0,
) -> torch.Tensor:
    """Iso-C: sum the task vectors, and flatten the spectrum of the sum: for a matrix,
    Σ_i τ_i = U Σ Vᵀ becomes θ_base + α·σ̄ U Vᵀ, σ̄ the mean singular value (isotropic scaling
    in the common subspace). With one model: θ_base + α·σ̄(τ) U Vᵀ of that task vector; with
    identical fine-tunes, T times that.

    Every tensor that is not 2-D (biases, norm weights, ≥3-D kernels) gets
    θ_base + α·mean_i τ_i, as in FusionBench's implementation; embeddings are 2-D and are
    merged as matrices. α is a tuned scaling factor (FusionBench's default 1.0 is used here;
    the bench searches it on validation data). Zero task vectors give the base. Directions
    whose singular value is 0 (a task vector of rank < min(rows, cols)) still receive the mean
    singular value, so for such inputs the result depends on the null space the SVD routine
    returns, as in FusionBench's implementation.
    """
    taus = stacked_task_vectors(tensors, base)  # (T, *shape)
    if not is_matrix(base):
        return finish(alpha * taus.mean(dim=0), base)
    u, s, vh = torch.linalg.svd(taus.sum(dim=0), full_matrices=False)
    return finish(alpha * s.mean() * (u @ vh), base)


def split_space(r: int, n: int, common_space_fraction: float) -> tuple[int, int]:
    """(common rank k_c, per-task rank k_t) with k_c + n·k_t = r: k_c starts at
    ⌊r·fraction⌋ and the rest is rounded to a multiple of n, as in FusionBench's implementation."""
    k_c = int(r * common_space_fraction)
    k_t = round((r - k_c) / n)
    k_t = min(k_t, r // n)
    return r - n * k_t, k_t


@merge_method(
    "iso_cts",
    reference=_REF,
    search_space={"alpha": [1.0, 1.3, 1.6], "common_space_fraction": [0.8]},
)
def iso_cts(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    alpha: Lambda = 1.0,
    common_space_fraction: Annotated[float, Field(ge=0, le=1)] = 0.8,
) -> torch.Tensor:
    """Iso-CTS: the common subspace of the summed task vector plus each task's own subspace,
    orthogonalised, with an isotropic spectrum.

    For a matrix with r = min(rows, cols) and T tasks: k_c ≈ ``common_space_fraction``·r
    directions come from the SVD of Σ_i τ_i (U_c, Σ_c, V_c), and k_t = (r − k_c)/T from
    the SVD of each task's residual τ_i − U_c U_cᵀ τ_i (the projection off the common space).
    The r left and r right vectors are concatenated, replaced by their orthogonal polar factors
    U⊥, V⊥, and the result is θ_base + α·σ̄ U⊥ V⊥ᵀ, σ̄ the mean of the r concatenated singular
    values. With one model this is Iso-C.

    Every tensor that is not 2-D (biases, norm weights, ≥3-D kernels) gets
    θ_base + α·mean_i τ_i, as in FusionBench's implementation; embeddings are 2-D and are
    merged as matrices. α is a tuned scaling factor (FusionBench's default 1.0 is used here;
    the bench searches it on validation data). Zero task vectors give the base. Directions
    whose singular value is 0 (a task vector of rank < min(rows, cols)) still receive the mean
    singular value, so for such inputs the result depends on the null space the SVD routine
    returns, as in FusionBench's implementation.
    """
    taus = stacked_task_vectors(tensors, base)  # (T, *shape)
    if not is_matrix(base):
        return finish(alpha * taus.mean(dim=0), base)
    n = taus.shape[0]
    k_c, k_t = split_space(min(base.shape), n, common_space_fraction)
    u, s, vh = torch.linalg.svd(taus.sum(dim=0), full_matrices=False)
    u_c, s_c, vh_c = u[:, :k_c], s[:k_c], vh[:k_c]  # (rows, k_c), (k_c,), (k_c, cols)
    us, ss, vhs = [], [], []
    if k_t > 0:
        for tau in taus:  # (rows, cols)
            residual = tau - u_c @ (u_c.T @ tau)  # off the common subspace
            ut, st, vht = torch.linalg.svd(residual, full_matrices=False)
            us.append(ut[:, :k_t])
            ss.append(st[:k_t])
            vhs.append(vht[:k_t])
    u_all = polar(torch.cat([*us, u_c], dim=1))  # (rows, r)
    vh_all = polar(torch.cat([*vhs, vh_c], dim=0))  # (r, cols)
    sigma = torch.cat([*ss, s_c]).mean()
    return finish(alpha * sigma * (u_all @ vh_all), base)
