"""Sparsification of task vectors and sign consensus, shared by the task-arithmetic family.

All functions take and return float tensors of one shape and never modify their input.
Random draws come from a CPU generator and are moved to the tensor's device, so a seed gives
the same masks on every device.
"""

from __future__ import annotations

import torch

from ..errors import MergeComputationError


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES "trim").

    Yadav et al. 2023, *TIES-Merging*, arXiv:2306.01708, step 1. At least one entry is
    kept in a non-empty tensor when ``density > 0``.
    """
    n = delta.numel()
    if density >= 1:
        return delta
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    mag = delta.abs().reshape(-1)
    threshold = torch.kthvalue(mag, n - k + 1).values  # the k-th largest; O(n) selection
    keep = mag > threshold  # fewer than k entries
    missing = k - int(keep.sum())
    if missing > 0:  # entries tied at the threshold: keep the first ones, exactly k in all
        keep[(mag == threshold).nonzero().squeeze(1)[:missing]] = True
    return delta * keep.reshape(delta.shape)


def random_drop(
    delta: torch.Tensor, density: float, *, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    """DARE: drop each entry with probability ``1 - density``, rescale survivors by ``1/density``.

    Yu et al. 2024, *Language Models are Super Mario* (DARE), arXiv:2311.03099, eq. 2.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator).to(delta.device) < density
    out = delta * keep
    return out / density if rescale else out


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` fraction (outliers) and the smallest entries.

    Davari & Belilovsky 2023, *Model Breadcrumbs*, arXiv:2312.06795. ``density`` entries
    are kept: those ranked just below the ``gamma`` largest magnitudes.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    keep_n = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep_n - n_top)  # shrink outlier removal if density demands it
    order = torch.argsort(delta.abs().reshape(-1))  # ascending
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[order[n_bottom : n_bottom + keep_n]] = True
    return delta * keep.reshape(delta.shape)


def magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """DELLA's MagPrune: keep probability grows linearly with magnitude rank, per row.

    Deep et al. 2024, *DELLA-Merging*, arXiv:2406.11617, §3.1: within each row, entries
    ranked by magnitude get keep probabilities spread uniformly over
    ``[density - epsilon, density + epsilon]`` (largest magnitude most likely kept);
    survivors are rescaled by ``1 / p_keep``.
    """
    if density >= 1:
        return delta
    if not (0 < density - epsilon and density + epsilon <= 1):
        raise MergeComputationError(
            f"della: density ± epsilon must stay within (0, 1]; got density={density}, epsilon={epsilon}."
        )
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta.reshape(delta.shape[0], -1)
    m = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(rows.dtype)  # 0 = smallest
    frac = ranks / max(m - 1, 1)
    p_keep = (density - epsilon) + 2 * epsilon * frac  # (rows, m)
    keep = torch.rand(rows.shape, generator=generator).to(rows.device) < p_keep
    out = rows * keep
    if rescale:
        out = out / p_keep
    return out.reshape(delta.shape)


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """TIES "elect": boolean mask of entries whose sign agrees with the mass-weighted majority.

    ``deltas``: (models, ...). The elected sign is the sign of the summed deltas (ties go
    to +); entries equal to zero never agree. Yadav et al. 2023, step 2.
    """
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == elected
