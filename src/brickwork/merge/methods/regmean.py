"""RegMean: the closed-form merge of linear layers that best matches every model's outputs
on its own inputs (Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of
Language Models, ICLR 2023, arXiv:2212.09849).

For a linear layer ``y = W x`` with input Gram matrices ``G_i = X_iᵀ X_i`` of model ``i``'s
calibration inputs, the merged weight minimises ``Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²``:

    Wᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ

With the paper's non-diagonal scale ``α`` every ``G_i``'s off-diagonal entries are multiplied
by ``α`` before the solve (``G̃ = α G + (1 − α) diag(G)``; ``α = 1`` is plain RegMean, the
paper uses ``α = 0.9``), which also keeps ``Σ G̃_i`` well conditioned. GPT-2's ``Conv1D``
stores ``W`` as ``(in, out)``: the same solve without the transposes. Tensors that are not
the weight of a linear layer (biases, norms, embeddings) are averaged, as in the paper.

``gram: mean`` uses ``G_i = X_iᵀX_i / n_i`` (as FusionBench does: each model's data counts
equally whatever its size); ``gram: sum`` uses the paper's ``X_iᵀX_i``
(models with more rows weigh more; then two models fit on disjoint data merge into the
least-squares fit on their union). ``check_rows`` (default true) refuses a Gram matrix
measured on fewer rows than the layer's input width (it is singular). The Gram matrices are solved in float64 with a Cholesky
factorisation; a singular ``Σ G̃_i`` gets the smallest ridge ``λ I`` (from 1e-10 × its mean
diagonal up) that makes it positive definite, with a :class:`RegularizedWarning` that the
output's provenance records.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Literal

import torch
from pydantic import Field

from ...errors import DataError, MergeComputationError, RegularizedWarning
from ...stats.store import TensorStatistics
from ..registry import merge_method

Alpha = Annotated[float, Field(ge=0, le=1)]


def scale_off_diagonal(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α G + (1 − α) diag(G)``: off-diagonal entries times ``α``, the diagonal kept."""
    return alpha * g + (1 - alpha) * torch.diag_embed(torch.diagonal(g))


def cholesky_with_ridge(a: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The Cholesky factor of a symmetric positive semi-definite ``a`` (float64), with the
    smallest ridge ``λ`` (from 1e-10 × its mean diagonal up) that makes ``a + λ I`` positive
    definite; returns ``(factor, λ)``, ``λ = 0`` when none was needed."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return chol, 0.0
    scale = float(torch.diagonal(a).abs().mean()) or 1.0
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for k in range(10, -3, -1):
        ridge = scale * 10.0**-k
        chol, info = torch.linalg.cholesky_ex(a + ridge * eye)
        if int(info) == 0:
            return chol, ridge
    raise MergeComputationError(
        "the summed Gram matrix is not positive semi-definite even with a ridge of 100 × its "
        "mean diagonal (non-finite statistics?); recompute the statistics."
    )


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``a⁻¹ b`` for a symmetric positive semi-definite ``a`` (float64); returns the ridge
    ``λ`` that was added to ``a``'s diagonal (0 when none was needed)."""
    chol, ridge = cholesky_with_ridge(a)
    return torch.cholesky_solve(b, chol), ridge


def check_rows(stats: list[TensorStatistics], width: int) -> None:
    """Each model's Gram matrix must come from at least ``width`` input rows (tokens)."""
    for st in stats:
        if st.rows < width:
            raise DataError(
                f"model '{st.model}': its Gram matrix comes from {st.rows} non-padding input "
                f"rows, fewer than the layer's input width {width}, so it is singular and "
                f"RegMean's solve ill-conditioned. Give at least {width} non-padding tokens "
                "(more examples, or longer ones: n_examples / max_length in the data block); "
                "several times that is better. Layers that see one row per example (a pooler "
                "or classifier on [CLS]) need that many examples; check_rows: false merges "
                "anyway (with alpha < 1 the system stays solvable)."
            )


#: Output columns solved at a time: the float64 temporaries of a (32000, 1024) LM head are
#: then (in, 4096) blocks instead of four (in, out) matrices of 262 MB each.
BLOCK = 4096


def regmean_merge(
    tensors: list[torch.Tensor],
    stats: list[TensorStatistics],
    *,
    alpha: float,
    gram: str,
    check: bool = True,
    where: str = "",
    block: int = BLOCK,
) -> torch.Tensor:
    """The RegMean closed form for one linear weight (see the module docstring).

    Memory: ``Σ G̃_i`` and ``B = Σ G̃_i W_iᵀ`` in float64, filled and solved ``block`` output
    columns at a time (one Cholesky factor for all blocks), beside one model's ``G̃_i``; the
    float64 copies of the weights and the products are never formed whole."""
    axis = stats[0].input_axis
    if any(st.input_axis != axis for st in stats) or tensors[0].dim() != 2:
        raise MergeComputationError(
            "the models' linear layers disagree on the weight layout (nn.Linear vs Conv1D)."
        )
    if check:
        check_rows(stats, tensors[0].shape[axis])
    n_in, n_out = tensors[0].shape[axis], tensors[0].shape[1 - axis]
    dev = tensors[0].device
    a = torch.zeros(n_in, n_in, dtype=torch.float64, device=dev)  # Σ G̃_i, (in, in)
    b = torch.zeros(n_in, n_out, dtype=torch.float64, device=dev)  # Σ G̃_i W_iᵀ, (in, out)
    for w, st in zip(tensors, stats):
        g = st.gram.to(torch.float64, copy=True)  # (in, in); a copy: scaled in place
        if gram == "mean":
            g /= st.rows
        diag = torch.diagonal(g).clone()
        g.mul_(alpha)
        torch.diagonal(g).copy_(diag)  # G̃ = α G + (1 − α) diag(G)
        a += g
        wt = w.T if axis == 1 else w  # (in, out), a view
        for s in range(0, n_out, block):
            b[:, s : s + block].addmm_(g, wt[:, s : s + block].to(torch.float64))
        del g
    chol, ridge = cholesky_with_ridge(a)
    del a
    for s in range(0, n_out, block):
        b[:, s : s + block] = torch.cholesky_solve(b[:, s : s + block], chol)  # (in, block)
    if ridge:
        warnings.warn(
            RegularizedWarning(
                f"{where}sum of the Gram matrices is singular; ridge {ridge:.3g} added to its "
                "diagonal"
            ),
            stacklevel=2,
        )
    out = b.T if axis == 1 else b
    return out.to(tensors[0].dtype)


def mean_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for t in tensors:
        acc += t
    acc /= len(tensors)  # in place: no second float64 copy of an embedding matrix
    return acc.to(tensors[0].dtype)


@merge_method(
    "regmean",
    reference="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language "
    "Models, arXiv:2212.09849",
    statistics=("gram",),
)
def regmean(
    tensors: list[torch.Tensor],
    *,
    statistics: list[TensorStatistics | None],
    alpha: Alpha = 0.9,
    gram: Literal["mean", "sum"] = "mean",
    check_rows: bool = True,
) -> torch.Tensor:
    """RegMean: linear weights by the closed form (Σ G̃_i)⁻¹ Σ G̃_i W_i from each model's input
    Gram matrices (off-diagonals scaled by alpha); every other tensor averaged."""
    have = [st is not None and st.gram is not None for st in statistics]
    if not any(have):
        return mean_of(tensors)
    if not all(have):
        lacking = [st.model for st in statistics if st is not None and st.gram is None]
        raise DataError(
            "some models have a Gram matrix for this tensor and others do not "
            f"({', '.join(lacking) or 'a model without statistics'}); compute the statistics of "
            "every model on the same architecture."
        )
    return regmean_merge(tensors, statistics, alpha=alpha, gram=gram, check=check_rows)  # type: ignore[arg-type]
