"""REPAIR: renormalise a merged model's hidden units to the statistics of its endpoints.

Jordan, Sedghi, Saukh, Entezari & Neyshabur, "REPAIR: REnormalizing Permuted Activations for
Interpolation Repair", ICLR 2023 (arXiv:2211.08403), §4. Interpolating two aligned networks
shrinks the variance of their hidden units ("variance collapse"), which is most of the loss
barrier that is left after alignment. REPAIR measures, for every unit ``u`` of every
pre-activation (the output of a Linear / Conv, or of the norm right after it), the mean
``μ_k[u]`` and standard deviation ``σ_k[u]`` of each endpoint ``k`` on data, and rescales the
merged model's unit so that

    mean = Σ_k w_k μ_k[u],   std = Σ_k w_k σ_k[u]

(``w_k``: the interpolation weights, uniform by default). The correction ``y ↦ s ⊙ y + t``,
``s = σ_target / σ_merged``, ``t = μ_target − s μ_merged``, is folded into the producer's
weight and bias (or into the norm's affine), so the result has the same architecture.

The producers are corrected one at a time in the order the forward pass reaches them, each
measured with every earlier correction in place, so after :func:`repair` every producer's
statistics on ``data`` equal the targets (up to float round-off), not only the first one's.
Statistics are over every axis but the unit axis (dim 1 of a conv activation ``(N, C, H, W)``,
the last dim of a Linear's), population variance, float64 sums, models in eval mode.

:func:`reset_bn_stats` is the paper's other tool (§3.3): recompute every BatchNorm's running
statistics on data (train-mode passes with a cumulative average), which corrects the
statistics of networks with BatchNorm before their norms.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from brickwork.align.calibration import evaluating, run_batch
from brickwork.align.spec import permutation_spec
from brickwork.errors import AlignError, DataError

_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AFFINE_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_TINY = 1e-12  # a merged unit with less spread than this is constant: only its mean is moved


def _unit_dim(module: nn.Module) -> int:
    # a Linear's units are its output's last dim; conv / norm channels are dim 1
    if isinstance(module, _LINEAR) or (
        isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1
    ):
        return -1
    return 1


class _Stats:
    """Per-unit sum and sum of squares (float64) of a module's output."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None

    def add(self, out: torch.Tensor, dim: int) -> None:
        z = out.detach().to(torch.float64).movedim(dim, -1)
        z = z.reshape(-1, z.shape[-1])  # (examples, units)
        s, q = z.sum(0), (z * z).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sq = q if self.sq is None else self.sq + q
        self.n += z.shape[0]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.sum / self.n
        return mean, (self.sq / self.n - mean * mean).clamp_min(0).sqrt()


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the statistics it needs are read."""


def _measure(
    model: nn.Module,
    names: Sequence[str],
    data: Iterable[Any],
    *,
    stop_after: str | None = None,
    order: list[str] | None = None,
) -> dict[str, _Stats]:
    """Statistics of the outputs of ``names`` over ``data`` (eval mode, no grad). With
    ``stop_after`` the pass ends once that module has run. ``order`` receives the names in the
    order the forward pass first reaches them."""
    modules = dict(model.named_modules())
    stats = {name: _Stats() for name in names}
    handles = []

    def hook(module, _args, out, _name):
        stats[_name].add(out, _unit_dim(module))
        if order is not None and _name not in order:
            order.append(_name)
        if _name == stop_after:
            raise _Stop

    for name in names:
        handles.append(
            modules[name].register_forward_hook(lambda m, a, o, _n=name: hook(m, a, o, _n))
        )
    try:
        with evaluating(model):
            for batch in data:
                with contextlib.suppress(_Stop):
                    run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if any(s.n == 0 for s in stats.values()):
        missing = [n for n, s in stats.items() if s.n == 0]
        raise DataError(
            f"REPAIR saw no output of {missing[:5]} on the data: pass data=[batch, ...], a "
            "non-empty iterable of batches the model accepts (it is read several times, so "
            "not a one-shot generator)."
        )
    return stats


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if n == 0:
        raise AlignError("repair needs at least one endpoint model; got endpoints=[].")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise AlignError(
            f"repair got {len(weights)} weights for {n} endpoints; pass one weight per endpoint."
        )
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise AlignError(
            f"repair weights must be finite, non-negative and not all zero; got {weights}."
        )
    total = sum(weights)
    return [w / total for w in weights]


def _producers(model: nn.Module) -> list[str]:
    names: list[str] = []
    for group in permutation_spec(model).groups:
        names += [p for p in group.producers if p not in names]
    return names


@torch.no_grad()
def _fold(module: nn.Module, name: str, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``module``'s output ``y`` becomes ``scale ⊙ y + shift`` along its unit axis."""
    if isinstance(module, _AFFINE_NORMS):
        if module.weight is None or module.bias is None:
            raise AlignError(
                f"cannot REPAIR '{name}' ({type(module).__name__}): it has no affine weight and "
                "bias to fold the correction into; build it with affine=True."
            )
        weight, bias, axis = module.weight, module.bias, 0
    elif isinstance(module, _LINEAR + _CONV):
        if module.bias is None:
            raise AlignError(
                f"cannot REPAIR '{name}' ({type(module).__name__}, bias=False): the mean "
                "correction needs a bias; add one (bias=True) or a BatchNorm after it."
            )
        weight, bias, axis = module.weight, module.bias, 0
    else:  # pragma: no cover - the spec only names these kinds
        raise AlignError(f"cannot REPAIR '{name}': {type(module).__name__} is not supported.")
    s = scale.to(weight.dtype)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight.mul_(s.view(shape).movedim(0, axis))
    bias.mul_(s).add_(shift.to(bias.dtype))


def repair(
    model: nn.Module,
    endpoints: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    weights: Sequence[float] | None = None,
) -> nn.Module:
    """A new model: ``model`` (typically an interpolation of the aligned ``endpoints``) with the
    per-unit mean and std of every group's producer renormalised on ``data`` to the
    ``weights``-average (default uniform; normalised to sum 1) of the endpoints' mean and std.

    ``endpoints`` must have ``model``'s architecture and module names and be aligned already
    (e.g. by :func:`brickwork.align`); their unit ``i`` is compared with ``model``'s unit ``i``.
    ``data`` is an iterable of batches (``model(batch)``, ``model(*batch)`` for a tuple,
    ``model(**batch)`` for a dict), read once per endpoint and once per producer. The
    producers are the ones :func:`~brickwork.align.spec.permutation_spec` lists (``producers``
    of each group): every Linear / Conv whose outputs are permutable hidden units, or the
    BatchNorm / GroupNorm / LayerNorm right after it. The final layer is not touched. No input
    is modified. See the module docstring for the method (Jordan et al. 2023)."""
    data = data if isinstance(data, (list, tuple)) else list(data)
    w = _weights(weights, len(endpoints))
    names = _producers(model)
    out = copy.deepcopy(model)
    if not names:
        return out
    modules = dict(out.named_modules())
    for endpoint in endpoints:
        missing = [n for n in names if n not in dict(endpoint.named_modules())]
        if missing:
            raise AlignError(
                f"endpoint {type(endpoint).__name__} has no module {missing[:3]}; the endpoints "
                "must have the merged model's architecture and module names."
            )
    target: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for wk, endpoint in zip(w, endpoints):
        for name, st in _measure(endpoint, names, data).items():
            mean, std = st.mean_std()
            old = target.get(name, (0.0, 0.0))
            target[name] = (old[0] + wk * mean, old[1] + wk * std)
    order: list[str] = []
    _measure(out, names, data[:1], order=order)  # the order the forward pass reaches them
    order += [n for n in names if n not in order]
    for name in order:
        mean, std = _measure(out, [name], data, stop_after=name)[name].mean_std()
        mean_t, std_t = target[name]
        if mean.shape != mean_t.shape:
            raise AlignError(
                f"'{name}' has {mean.numel()} units in the merged model but {mean_t.numel()} in "
                "the endpoints; the endpoints must have the merged model's shapes."
            )
        scale = torch.where(std > _TINY, std_t / std.clamp_min(_TINY), torch.ones_like(std))
        _fold(modules[name], name, scale, mean_t - scale * mean)
    return out


def reset_bn_stats(model: nn.Module, data: Iterable[Any]) -> nn.Module:
    """A new model whose BatchNorm running statistics are recomputed on ``data``.

    Every BatchNorm's running statistics are zeroed and re-accumulated with ``momentum=None``
    (a cumulative average) over one train-mode pass through ``data`` under ``torch.no_grad``:
    ``running_mean`` is the mean of the batch means and ``running_var`` the mean of the batch
    (unbiased) variances, each norm seeing the batch normalised by the norms before it with
    batch statistics (as in training; Jordan et al. 2023, §3.3). Parameters are unchanged; the
    returned model keeps ``model``'s momentum and train/eval flags. ``model`` is not modified."""
    out = copy.deepcopy(model)
    norms = [m for m in out.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return out
    untracked = [n for n, m in out.named_modules() if m in norms and not m.track_running_stats]
    if untracked:
        raise AlignError(
            f"reset_bn_stats: BatchNorm {untracked[:3]} has track_running_stats=False, so it "
            "has no running statistics to reset; build it with track_running_stats=True (its "
            "batch statistics are used in every mode already)."
        )
    flags = [(m, m.training) for m in out.modules()]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    out.train()
    seen = 0
    try:
        with torch.no_grad():
            for batch in data:
                run_batch(out, batch)
                seen += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for module, training in flags:
            module.training = training
    if seen == 0:
        raise DataError("reset_bn_stats got no batches: pass data=[batch, ...].")
    return out
