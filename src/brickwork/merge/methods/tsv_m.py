from __future__ import annotations

import torch

from ..registry import merge_method
from ._params import Lambda
from ._subspace import finish, is_matrix, polar, stacked_task_vectors


@merge_method(
    "tsv_m",
    reference=(
        "Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model "
        "Merging (CVPR 2025), arXiv:2412.00081"
    ),
    search_space={"alpha": [0.8, 1.0, 1.2]},
)
def tsv_m(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    alpha: Lambda = 1.0,
) -> torch.Tensor:
    """TSV-Merge: keep each task vector's top 1/T singular vectors, decorrelate the tasks'
    singular vectors, and add the sum to the base, scaled by ``alpha``.

    For a matrix (a 2-D tensor, embeddings included, as in FusionBench's implementation) with
    T task vectors τ_i = U_i Σ_i V_iᵀ and r = min(rows, cols): keep k = ⌊r/T⌋ singular
    triplets of each (at least 1), concatenate U = [U_1,k … U_T,k], Σ = diag(Σ_1,k … Σ_T,k),
    V = [V_1,k … V_T,k], replace U and V by their orthogonal polar factors (U⊥ = P Qᵀ from
    U = P S Qᵀ: the whitening / orthogonal Procrustes step) and return θ_base + α U⊥ Σ V⊥ᵀ.
    FusionBench's default, used here, is α = 1.

    Every other tensor (biases, norm weights, ≥3-D kernels) gets θ_base + α·mean_i τ_i, as in
    FusionBench's implementation. With one model k = r, U and V are already orthonormal and
    the result is θ_base + α τ (task arithmetic); zero task vectors give the base. If the task
    vectors share singular directions (e.g. identical fine-tunes), U is rank-deficient and its
    polar factor is not unique: the result then depends on the SVD routine, in FusionBench as
    here.
    """
    taus = stacked_task_vectors(tensors, base)  # (T, *shape)
    n = taus.shape[0]
    if not is_matrix(base):
        return finish(alpha * taus.mean(dim=0), base)
    k = max(1, min(base.shape) // n)
    us, ss, vhs = [], [], []
    for tau in taus:  # (rows, cols)
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])  # (rows, k)
        ss.append(s[:k])  # (k,)
        vhs.append(vh[:k])  # (k, cols)
    u_cat = polar(torch.cat(us, dim=1))  # (rows, T·k)
    vh_cat = polar(torch.cat(vhs, dim=0))  # (T·k, cols)
    s_cat = torch.cat(ss)  # (T·k,)
    merged = (u_cat * s_cat) @ vh_cat  # U⊥ diag(Σ) V⊥ᵀ: (rows, cols)
    return finish(alpha * merged, base)
