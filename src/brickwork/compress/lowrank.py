"""Low-rank factorisation of a model's linear layers: plain SVD, ASVD and SVD-LLM.

Every chosen ``nn.Linear`` (or GPT-2 ``Conv1D``) with weight ``W`` of shape ``(m, n)``
(out, in) becomes a :class:`LowRankLinear`: ``Linear(n, r, bias=False)`` then
``Linear(r, m)`` (the original bias), computing ``x ↦ B (A x) + b`` with ``B A ≈ W``.

Methods (``X``: the layer's calibration inputs as rows, ``G = XᵀX``):

- ``svd``: truncated SVD of ``W``, the Eckart–Young optimum in Frobenius norm;
- ``asvd`` (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for
  Compressing Large Language Models", arXiv:2312.05821): scale the input columns by
  ``S = diag(s_j)^α``, SVD of ``W S``, undo: ``W ≈ U_r Σ_r (V_rᵀ S⁻¹)``. The paper's
  ``s_j`` is the mean absolute activation; brickwork reads one shared Gram matrix
  (DESIGN.md "Statistics"), so ``s_j`` is the RMS activation ``sqrt(G_jj / rows)``;
  ``α = 0.5`` by default. An input that never fires (``s_j = 0``) gets ``s_j`` = 1e-6 of
  the largest, so ``S`` stays invertible;
- ``svd_llm`` (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition
  for Large Language Model Compression", arXiv:2403.07378): Cholesky ``G/rows = L Lᵀ``,
  SVD of ``W L``, ``W ≈ U_r Σ_r (V_rᵀ L⁻¹)``. Then ``‖(W − Ŵ) X‖_F = ‖(W − Ŵ) L‖_F``,
  which truncation minimises: the rank-r output error on the calibration inputs is at
  most plain SVD's. When ``G`` is not positive definite (fewer rows than inputs, dead
  inputs) a ridge ``λ I`` is added, ``λ = 1e-6 · mean(diag G) · 10^k`` for the first
  ``k = 0, 1, ...`` whose Cholesky succeeds; the λ used is reported per layer.

Budget: ``ratio`` keeps that fraction of each factorised layer's parameters,
``r = floor(ratio · m·n / (m + n))``; a layer is factorised only when ``r ≥ 1`` and
``r (m + n) < m n`` (otherwise it stays dense: factorising would not save anything).
``rank`` gives every layer the same rank (a rank above ``min(m, n)`` is an error), or a
``{module path: rank}`` mapping. By default the Linear / Conv1D modules inside the
transformer layers are factorised (``brickwork.arch.layer_name``), not embeddings or heads;
``include`` / ``exclude`` are glob patterns on module paths (``*.mlp.*``, ``*q_proj``).
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import DataError, RecipeError, did_you_mean

METHODS = ("svd", "asvd", "svd_llm")
NEEDS_DATA = ("asvd", "svd_llm")


class LowRankLinear(nn.Module):
    """``x ↦ second(first(x))``: ``first = Linear(in, rank, bias=False)``,
    ``second = Linear(rank, out, bias=bias)``; a rank-``rank`` stand-in for ``Linear(in, out)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.second.bias is not None,
        }


@dataclass(frozen=True)
class LayerReport:
    """What happened to one layer: rank, parameters before/after, ridge (svd_llm)."""

    path: str
    shape: tuple[int, int]  # (out, in)
    rank: int | None  # None: left dense
    params_before: int
    params_after: int
    ridge: float = 0.0


# -- the factorisation of one matrix ------------------------------------------------------
def _truncate(
    m: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # U_r Σ_r, Σ_r, V_rᵀ
    u, s, vh = torch.linalg.svd(m, full_matrices=False)  # (m, k), (k,), (k, n)
    return u[:, :rank] * s[:rank], s[:rank], vh[:rank]


def _cholesky(g: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower ``L`` with ``L Lᵀ = g + λ I`` and the smallest ridge ``λ`` of the ladder that works."""
    scale = float(g.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    for k in range(-1, 12):
        lam = 0.0 if k < 0 else 1e-6 * scale * 10**k
        chol, info = torch.linalg.cholesky_ex(g + lam * eye)
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            return chol, lam
    raise DataError("the Gram matrix XᵀX is not finite; check the calibration data")


def factorize_weight(
    weight: torch.Tensor,
    rank: int,
    *,
    method: str = "svd",
    gram: torch.Tensor | None = None,
    rows: int = 1,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, ridge)`` with ``B`` ``(m, r)``, ``A`` ``(r, n)``, ``B A ≈ weight`` ``(m, n)``.

    ``gram``: ``XᵀX`` of the layer's inputs over ``rows`` rows (needed by asvd / svd_llm).
    Computed in float64; returned in ``weight``'s dtype."""
    w = weight.detach().to(torch.float64)  # (out m, in n)
    ridge = 0.0
    if method == "svd":
        b, _, a = _truncate(w, rank)
    elif method == "asvd":
        s = (gram.diagonal().to(torch.float64) / max(rows, 1)).clamp_min(0).sqrt()  # RMS (n,)
        s = s.clamp_min(1e-6 * float(s.max().clamp_min(1e-30))) ** alpha
        b, _, a = _truncate(w * s, rank)  # W S
        a = a / s  # V_rᵀ S⁻¹
    elif method == "svd_llm":
        chol, ridge = _cholesky(gram.to(torch.float64) / max(rows, 1))  # (n, n) lower
        b, _, vh = _truncate(w @ chol, rank)  # W L
        # A = V_rᵀ L⁻¹, i.e. A L = V_rᵀ  ⇔  Lᵀ Aᵀ = V_r
        a = torch.linalg.solve_triangular(chol.T, vh.T, upper=True).T
    else:
        raise RecipeError(f"unknown low-rank method {method!r}; known: {', '.join(METHODS)}")
    return b.to(weight.dtype), a.to(weight.dtype), ridge


# -- which layers, which ranks -------------------------------------------------------------
def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _linear_shape(mod: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of an ``nn.Linear`` or GPT-2 ``Conv1D`` (whose weight is ``(in, out)``)."""
    w = mod.weight
    return (w.shape[1], w.shape[0]) if _is_conv1d(mod) else (w.shape[0], w.shape[1])


def _weight_out_in(mod: nn.Module) -> torch.Tensor:
    return mod.weight.T if _is_conv1d(mod) else mod.weight  # (out, in)


def _matches(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern)


def select_layers(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, nn.Module]:
    """``{module path: module}`` of the linear layers to factorise (see the module docstring)."""
    from ..arch import layer_name

    linears = {
        n: m for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or _is_conv1d(m))
    }
    if include:
        for pat in include:
            if not any(_matches(n, pat) for n in linears):
                near = did_you_mean(pat, linears)
                raise RecipeError(
                    f"include pattern '{pat}' matches no linear layer of "
                    f"{type(model).__name__}.{near} Layers look like '{next(iter(linears), '')}'."
                )
        chosen = {n: m for n, m in linears.items() if any(_matches(n, p) for p in include)}
    else:
        chosen = {n: m for n, m in linears.items() if layer_name(n + ".weight") is not None}
    chosen = {n: m for n, m in chosen.items() if not any(_matches(n, p) for p in exclude)}
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for n, m in chosen.items():
        tied = [o for o in owners.get(id(m.weight), []) if o != f"{n}.weight"]
        if tied:
            raise RecipeError(
                f"layer '{n}': its weight is tied to '{tied[0]}' (a shared tensor); "
                "factorising it would untie them. Leave it out (exclude pattern)."
            )
    if not chosen:
        raise RecipeError(
            f"no linear layer of {type(model).__name__} is selected for factorisation "
            f"(include={list(include or [])}, exclude={list(exclude)}); widen the filters."
        )
    return chosen


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """``floor(ratio · m n / (m + n))``: the rank whose two factors hold ``ratio`` of ``m n``."""
    m, n = out_features, in_features
    return math.floor(ratio * m * n / (m + n) + 1e-9)


def plan_ranks(
    layers: Mapping[str, nn.Module],
    *,
    ratio: float | None = None,
    rank: int | Mapping[str, int] | None = None,
) -> dict[str, int | None]:
    """``{path: rank or None (stays dense)}`` for ``ratio`` or ``rank`` (exactly one)."""
    if (ratio is None) == (rank is None):
        raise RecipeError("give exactly one of ratio (e.g. 0.8) or rank (e.g. 64)")
    out: dict[str, int | None] = {}
    if ratio is not None:
        if not (isinstance(ratio, int | float) and 0 < ratio <= 1):
            raise RecipeError(f"ratio must be in (0, 1], got {ratio}")
        for path, mod in layers.items():
            m, n = _linear_shape(mod)
            r = rank_for_ratio(m, n, ratio)
            out[path] = r if r >= 1 and r * (m + n) < m * n else None
        return out
    if isinstance(rank, Mapping):
        unknown = [p for p in rank if p not in layers]
        if unknown:
            raise RecipeError(
                f"rank given for '{unknown[0]}', which is not a selected linear layer."
                f"{did_you_mean(unknown[0], layers)}"
            )
    for path, mod in layers.items():
        r = rank.get(path) if isinstance(rank, Mapping) else rank
        if r is None:
            out[path] = None
            continue
        m, n = _linear_shape(mod)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise RecipeError(f"rank for '{path}' must be a positive integer, got {r!r}")
        if r > min(m, n):
            raise RecipeError(
                f"rank {r} is larger than layer '{path}' allows: its weight is {m}×{n} "
                f"(out×in), so the rank is at most {min(m, n)}. Give a smaller --rank, or "
                "leave the layer out with an exclude pattern."
            )
        out[path] = r
    return out


# -- the model -----------------------------------------------------------------------------
def factorize_model(
    model: nn.Module,
    *,
    method: str = "svd",
    ratio: float | None = None,
    rank: int | Mapping[str, int] | None = None,
    grams: Mapping[str, tuple[torch.Tensor, int]] | None = None,
    alpha: float = 0.5,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> tuple[nn.Module, list[LayerReport]]:
    """A copy of ``model`` whose selected linear layers are :class:`LowRankLinear` s.

    ``grams``: ``{module path: (XᵀX, rows)}`` of each layer's inputs (asvd / svd_llm; see
    :func:`gram_statistics`). ``model`` is not changed. Returns the copy and a report per
    selected layer (``rank=None`` where the layer stayed dense)."""
    if method not in METHODS:
        raise RecipeError(
            f"unknown low-rank method '{method}'. Known: {', '.join(METHODS)}."
            f"{did_you_mean(method, METHODS)}"
        )
    if method in NEEDS_DATA and grams is None:
        raise DataError(
            f"method '{method}' needs calibration data (activation statistics); give text "
            "files with --data FILE (Python: grams=gram_statistics(model, batches))."
        )
    if not (isinstance(alpha, int | float) and alpha > 0):
        raise RecipeError(f"alpha must be > 0, got {alpha}")
    new = copy.deepcopy(model)
    layers = select_layers(new, include=include, exclude=exclude)
    ranks = plan_ranks(layers, ratio=ratio, rank=rank)
    from ..route.format import replace_module

    reports = []
    for path, mod in layers.items():
        m, n = _linear_shape(mod)
        before = m * n + (m if mod.bias is not None else 0)
        r = ranks[path]
        if r is None:
            reports.append(LayerReport(path, (m, n), None, before, before))
            continue
        gram, rows = (None, 1)
        if method in NEEDS_DATA:
            if path not in grams:
                raise DataError(
                    f"no activation statistics for layer '{path}': the calibration data "
                    "never reached it (does the model's forward pass use it?)."
                )
            gram, rows = grams[path]
        w = _weight_out_in(mod)
        b, a, ridge = factorize_weight(
            w, r, method=method, gram=gram, rows=rows, alpha=alpha
        )  # (m, r), (r, n)
        low = LowRankLinear(n, m, r, bias=mod.bias is not None).to(w.dtype)
        with torch.no_grad():
            low.first.weight.copy_(a)
            low.second.weight.copy_(b)
            if mod.bias is not None:
                low.second.bias.copy_(mod.bias)
        replace_module(new, path, low)
        after = r * (m + n) + (m if mod.bias is not None else 0)
        reports.append(LayerReport(path, (m, n), r, before, after, ridge))
    return new, reports


def gram_statistics(
    model: nn.Module, batches: Sequence[Any], *, where: str = "model"
) -> dict[str, tuple[torch.Tensor, int]]:
    """``{module path: (XᵀX, rows)}`` of every linear layer's inputs on ``batches``, through
    the shared collector (``brickwork.statistics_for(model, batches, "gram")``, cached)."""
    from ..stats import statistics_for

    f = statistics_for(model, batches, "gram", where=where)
    out = {}
    for name, meta in f.info["tensors"].items():
        g = f.get(name)
        if g is not None and name.endswith(".weight"):
            out[name[: -len(".weight")]] = (g, int(meta["rows"]))
    return out


def summary(reports: Sequence[LayerReport]) -> dict[str, Any]:
    """Parameter counts of the selected layers before / after, for provenance and the card."""
    before = sum(r.params_before for r in reports)
    after = sum(r.params_after for r in reports)
    return {
        "layers_selected": len(reports),
        "layers_factorised": sum(r.rank is not None for r in reports),
        "params_before": before,
        "params_after": after,
        "kept_fraction": after / before if before else 1.0,
        "layers": [asdict(r) for r in reports],
    }
