"""Helpers shared by the per-matrix subspace methods (TSV-M, Iso-C, Iso-CTS, WUDI).

These methods treat a 2-D tensor as a matrix (SVD, products) and every other tensor (biases,
norms, ≥3-D kernels) by its paper's rule, usually the mean task vector. SVD has no kernels
for bfloat16 / float16, so those compute dtypes are raised to float32 here and the result is
rounded once, back to the compute dtype, at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (no SVD / stable Adam there), the dtype itself otherwise."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def stacked_task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """τ_i = θ_i − θ_base, stacked: ``(models, *shape)`` in the working dtype."""
    dt = working_dtype(base.dtype)
    b = base.to(dt)
    return torch.stack([t.to(dt) - b for t in tensors])  # (models, *shape)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of ``x`` (the nearest matrix with orthonormal columns, or
    rows if it is wide): ``P Qᵀ`` from the thin SVD ``x = P Σ Qᵀ`` (orthogonal Procrustes)."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def finish(delta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base + delta`` in the compute dtype and the base's shape."""
    return (base.to(delta.dtype) + delta).to(base.dtype).reshape(base.shape)


def is_matrix(t: torch.Tensor) -> bool:
    """2-D and not degenerate: the tensors these methods decompose."""
    return t.ndim == 2 and min(t.shape) > 0
