"""Fisher merging: a weighted average of the models, entry by entry, weighted by each model's
diagonal Fisher information (Matena & Raffel 2022, Merging Models with Fisher-Weighted
Averaging, NeurIPS 2022, arXiv:2111.09832):

    θ* = Σ_i λ_i F_i ⊙ θ_i / Σ_i λ_i F_i

``F_i`` is model ``i``'s diagonal Fisher (``brickwork.stats``: per-example squared
gradients of log p(y|x), y from the model's own predictive distribution by default, the
true Fisher), floored at ``fisher_floor`` (``max(F, floor)``) and with ``epsilon`` added
(FusionBench's ``minimal_fisher_weight``), so an entry no model's data moves gets the plain
weighted average instead of 0 / 0. ``weight`` is the paper's ``λ_i``; ``normalize: true``
divides each model's Fisher by its L2 norm over every parameter
(``λ_i / (‖F_i‖ + epsilon)``, as FusionBench's ``normalize_fisher_weight`` computes it), so
a model whose gradients are larger overall does not dominate. Tensors without a Fisher
(buffers) are averaged with the weights.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ...errors import DataError
from ...stats.store import TensorStatistics
from ..registry import merge_method
from ._params import Weight

NonNegative = Annotated[float, Field(ge=0)]


@merge_method(
    "fisher",
    reference="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging, "
    "arXiv:2111.09832",
    statistics=("fisher",),
)
def fisher(
    tensors: list[torch.Tensor],
    *,
    statistics: list[TensorStatistics | None],
    weight: Weight = 1.0,
    fisher_floor: NonNegative = 1e-6,
    epsilon: NonNegative = 0.0,
    normalize: bool = False,
) -> torch.Tensor:
    """Fisher-weighted average Σ λ_i F_i θ_i / Σ λ_i F_i of the models (diagonal Fisher,
    floored at fisher_floor, plus epsilon; normalize: each F_i divided by its norm)."""
    dev = tensors[0].device
    lam = torch.tensor(list(weight), dtype=torch.float64, device=dev)  # (models,)
    have = [st is not None and st.fisher is not None for st in statistics]
    if not any(have):
        out = sum(w * t.to(torch.float64) for w, t in zip(lam, tensors)) / lam.sum()
        return out.to(tensors[0].dtype)
    if not all(have):
        raise DataError(
            "some models have a Fisher for this tensor and others do not; compute the "
            "statistics of every model on the same architecture."
        )
    if normalize:
        norms = torch.tensor([st.fisher_norm or 0.0 for st in statistics], dtype=torch.float64)
        lam = lam * (1.0 / (norms.to(dev) + max(epsilon, 1e-30)))
    num = torch.zeros(tensors[0].shape, dtype=torch.float64, device=dev)
    den = torch.zeros_like(num)
    for li, t, st in zip(lam, tensors, statistics):
        f = st.fisher.to(device=dev, dtype=torch.float64).clamp(min=fisher_floor) + epsilon
        num += li * f * t.to(torch.float64)
        den += li * f
    zero = den == 0  # only with fisher_floor = epsilon = 0: the weighted average there
    if zero.any():
        avg = sum(li * t.to(torch.float64) for li, t in zip(lam, tensors)) / lam.sum()
        return torch.where(zero, avg, num / torch.where(zero, 1.0, den)).to(tensors[0].dtype)
    return (num / den).to(tensors[0].dtype)
