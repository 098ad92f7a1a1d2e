"""ZipIt!: merge the features of several models, within and across models, without training.

Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman, "ZipIt! Merging Models from Different Tasks
without Training", ICLR 2024 (arXiv:2305.03053), §4. For each permutation group (hidden layer,
:func:`~brickwork.align.spec.permutation_spec`) of K models with ``n`` units each:

1. **Features.** Run every model on the calibration batches and concatenate the group's
   activations (the input of the Linear that consumes it, after the activation function):
   ``Kn`` features. Their ``Kn × Kn`` correlation matrix holds pairs *within* a model as well
   as *across* models.
2. **Greedy zipping** (the paper's Algorithm / §4.3). Repeatedly merge the most correlated
   pair of features (clusters) until ``n`` remain. A merged cluster's correlation with any
   other is the minimum of its parts' (complete linkage); a pair is scored by that correlation
   times ``alpha ** m`` for the ``m`` merges its two clusters went through: ``alpha > 0`` lets
   a feature be merged again at a discount (the paper's α), ``alpha <= 0`` forbids it (each
   cluster is then a pair). ``beta`` is the paper's *same-model budget*: each model may take part in at
   most ``int(beta · (K−1)n / K)`` merges whose two clusters hold features of that model only
   (``beta = 0``: only cross-model merges, like a matching). If the budgets and ``alpha`` leave
   no allowed pair before ``n`` clusters remain, the most correlated remaining pair is merged.
3. **Merge and unmerge matrices.** ``U`` (``Kn × n``) has ``U[f, c] = 1`` when feature ``f``
   is in cluster ``c``; ``M = (U diag(1/|c|))ᵀ`` (``n × Kn``) averages each cluster. Clusters
   are ordered by their first feature (model 0's units first, in model 0's order).
4. **Weights.** A tensor that produces a group's units (Linear weight rows, bias, norm
   parameters) is merged as ``Σ_k M_k W_k U_k^prev`` (``M_k``, ``U_k``: model k's block of
   columns / rows), where ``U_k^prev`` turns the merged features of the previous group back
   into model k's (``W_next · U``). Per-unit norms are merged like biases (exact for a
   permuted copy; an approximation otherwise).

**Partial zipping** (``stop_at=k``): only the first ``k`` groups are zipped. Each model keeps
its own remaining layers; the first of them reads the zipped features through ``U_k``
(``W_k U_k``), and the result is a :class:`ZippedEnsemble` that averages the K models' outputs.
It holds K full copies of the architecture whose first ``k`` layers are identical (the shared
prefix is computed once per member; simple and exact, not the fastest). ``stop_at=0`` is the
plain output ensemble. ``stop_at=None`` (or the number of groups) zips everything and returns
one module of the inputs' architecture: the heads (Linear weights that read the last group
and produce the outputs) and any tensor in no group are averaged, which equals averaging the
outputs when the model ends in a Linear.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from brickwork.align.calibration import attention_mask, evaluating, hooked, real_tokens
from brickwork.align.ot_fusion import _collect, _contract, _f64, _is_input, _units
from brickwork.align.spec import PermutationSpec
from brickwork.errors import AlignError, DataError

_EPS = 1e-12


class ZippedEnsemble(nn.Module):
    """K partially zipped models (same architecture, identical zipped prefix): the output is
    the mean of the members' outputs."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        outs = [member(*args, **kwargs) for member in self.members]
        return torch.stack(outs).mean(0)


def match(
    correlation: torch.Tensor, num_models: int, *, alpha: float = 0.5, beta: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """ZipIt's greedy matching on a ``(Kn, Kn)`` correlation matrix (model k's features are
    rows ``k n … (k+1) n − 1``). Returns ``(M, U)``: the merge ``(n, Kn)`` and unmerge
    ``(Kn, n)`` matrices (see the module docstring)."""
    total = correlation.shape[0]
    if correlation.shape != (total, total) or num_models < 1 or total % num_models:
        raise AlignError(
            f"ZipIt matching needs a square correlation matrix of {num_models} models' "
            f"features, got shape {tuple(correlation.shape)}."
        )
    n = total // num_models
    raw = _f64(correlation).numpy().copy()  # complete linkage between the clusters
    np.fill_diagonal(raw, -np.inf)
    clusters = [[f] for f in range(total)]
    alive = np.ones(total, dtype=bool)
    merges = np.zeros(total)  # merges each cluster went through
    pure = np.arange(total) // n  # the model all of a cluster's features come from, or -1
    budget = np.full(num_models, int(beta * (total - n) / num_models + 1e-9))
    for _ in range(total - n):
        if alpha > 0:
            scale = alpha**merges
            sims = raw * scale[:, None] * scale[None, :]
        else:  # a merged cluster is final
            sims = np.where((merges[:, None] > 0) | (merges[None, :] > 0), -np.inf, raw)
        for model in np.flatnonzero(budget <= 0):  # no merges within this model any more
            sel = pure == model
            sims[sel[:, None] & sel[None, :]] = -np.inf
        i, j = divmod(int(np.argmax(sims)), total)
        if sims[i, j] == -np.inf:  # budgets and alpha allow nothing: the best remaining pair
            i, j = divmod(int(np.argmax(raw)), total)
        i, j = min(i, j), max(i, j)
        if pure[i] == pure[j] and pure[i] >= 0:
            budget[pure[i]] -= 1
        clusters[i] += clusters[j]
        alive[j] = False
        merges[i] += merges[j] + 1
        row = np.minimum(raw[i], raw[j])
        raw[i, :], raw[:, i] = row, row
        raw[j, :], raw[:, j] = -np.inf, -np.inf
        raw[i, i] = -np.inf
        pure[i] = pure[i] if pure[i] == pure[j] else -1
        pure[j] = -2
    kept = np.flatnonzero(alive)  # ordered by first feature: a cluster keeps its smallest index
    unmerge = torch.zeros(total, len(kept), dtype=torch.float64)
    for c, index in enumerate(kept):
        unmerge[clusters[index], c] = 1.0
    merge = (unmerge / unmerge.sum(0, keepdim=True)).T
    return merge, unmerge


def _correlations(
    models: Sequence[nn.Module], spec: PermutationSpec, data: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """``{group: (Kn, Kn) correlation of every model's features}`` on the batches."""
    sums: dict[str, list] = {g.name: [0, 0.0, 0.0] for g in spec.groups}  # n, Σz, Σ zzᵀ
    modules = [dict(model.named_modules()) for model in models]
    with evaluating(*models):
        for batch in data:
            seen = [_collect(model, spec, batch) for model in models]
            for group in spec.groups:
                member = next(m for m in group.members if _is_input(group, m))
                feats = []
                for mods, z in zip(modules, seen):
                    consumer = mods[group.consumers[0]]
                    feats.append(_units(z[group.name], consumer, member, group.size))
                f = torch.cat(feats, 1)  # (examples, K * units)
                s = sums[group.name]
                s[0] += f.shape[0]
                s[1] = s[1] + f.sum(0)
                s[2] = s[2] + f.T @ f
    if spec.groups and min(s[0] for s in sums.values()) < 2:
        raise DataError(
            "ZipIt needs calibration data with at least 2 examples; pass data=[batch, ...] "
            "(batches every model accepts)."
        )
    out = {}
    for name, (count, total, outer) in sums.items():
        mean = total / count
        cov = outer / count - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt()
        out[name] = cov / (torch.outer(std, std) + _EPS)
    return out


def _zip_states(
    sds: list[dict[str, torch.Tensor]],
    spec: PermutationSpec,
    mats: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> list[dict[str, torch.Tensor]]:
    """One state dict per model: zipped tensors merged (the same in every one), tensors that
    read zipped features ``W_k U_k``, the rest model k's own."""
    k_models = len(sds)
    moves = spec.members_of()
    out: list[dict[str, torch.Tensor]] = [{} for _ in sds]
    for name, ref in sds[0].items():
        zipped = [(g, m) for g, m in moves.get(name, []) if g.name in mats]
        producing = [(g, m) for g, m in zipped if not _is_input(g, m)]
        if not zipped or not ref.is_floating_point():
            for k, sd in enumerate(sds):
                out[k][name] = sd[name].detach().clone()
            continue
        produced = sorted({g.name for g, _ in producing})  # GPT-2's c_attn: 3 slices, 1 group
        if len(produced) > 1:
            raise AlignError(
                f"tensor '{name}' produces the units of {len(produced)} groups "
                f"({produced}); ZipIt merges one produced axis per tensor."
            )
        per_model = []
        for k, sd in enumerate(sds):
            t = _f64(sd[name])
            for group, member in zipped:
                merge, unmerge = mats[group.name]
                n = group.size
                if _is_input(group, member):
                    t = _contract(t, member, n, unmerge[k * n : (k + 1) * n])  # W_k U_k
                else:
                    t = _contract(t, member, n, merge[:, k * n : (k + 1) * n].T)  # M_k W_k
            per_model.append(t)
        if producing:
            merged = sum(per_model).to(ref.dtype)
            for k in range(k_models):
                out[k][name] = merged.clone()
        else:
            for k in range(k_models):
                out[k][name] = per_model[k].to(ref.dtype)
    return out


def _mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of the per-model state dicts (float64 sums, model 0's dtypes); tensors that are
    not floating point are model 0's."""
    out = {}
    for name, ref in states[0].items():
        if ref.is_floating_point():
            out[name] = (sum(_f64(s[name]) for s in states) / len(states)).to(ref.dtype)
        else:
            out[name] = ref.detach().clone()
    return out


def _check_models(models: Sequence[nn.Module]) -> PermutationSpec:
    from brickwork.align.api import _common_spec

    if len(models) < 2:
        raise AlignError(f"zipit needs at least 2 models; got {len(models)}.")
    if not all(isinstance(m, nn.Module) for m in models):
        raise AlignError(
            f"zipit takes a sequence of torch nn.Module; got {[type(m).__name__ for m in models]}."
        )
    spec = _common_spec(models[0], models[1])
    for other in models[2:]:
        _common_spec(models[0], other)
    nested = [g.name for g in spec.groups if g.parent is not None]
    if nested:
        raise AlignError(
            f"zipit does not support nested permutation groups ({nested}); align these "
            "models with method='weight' or 'activation' instead."
        )
    return spec


def zip_with_maps(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    stop_at: int | None = None,
    alpha: float = 0.5,
    beta: float = 0.5,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """:func:`zipit` that also returns the merge matrices ``{group: M (n × Kn)}`` of the zipped
    groups."""
    models = list(models)
    spec = _check_models(models)
    groups = [g.name for g in spec.groups]
    if stop_at is not None and not 0 <= stop_at <= len(groups):
        raise AlignError(
            f"stop_at={stop_at} is out of range: the models have {len(groups)} hidden-unit "
            f"groups ({groups}); pass 0 … {len(groups)} (the number of groups to zip) or None."
        )
    if data is None:
        raise DataError("zipit needs calibration data: pass data=[batch, ...].")
    depth = len(groups) if stop_at is None else stop_at
    zipped = spec.groups[:depth]
    mats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if zipped:
        corr = _correlations(models, PermutationSpec(tuple(zipped)), data)
        mats = {g.name: match(corr[g.name], len(models), alpha=alpha, beta=beta) for g in zipped}
    states = _zip_states([m.state_dict() for m in models], spec, mats)
    merges = {name: m.to(torch.float32) for name, (m, _) in mats.items()}
    if depth == len(groups):
        out = copy.deepcopy(models[0])
        out.load_state_dict(_mean_state(states))
        return out, merges
    members = []
    for model, state in zip(models, states):
        member = copy.deepcopy(model)
        member.load_state_dict(state)
        members.append(member)
    return ZippedEnsemble(members), merges


def zipit(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    stop_at: int | None = None,
    alpha: float = 0.5,
    beta: float = 0.5,
) -> nn.Module:
    """Zip ``models`` (at least 2, one architecture and width) into one network (ZipIt!, see
    the module docstring). ``data``: calibration batches (``model(batch)``, a tuple as
    ``model(*batch)``, a dict as ``model(**batch)``). ``stop_at``: zip only the first
    ``stop_at`` hidden-unit groups and average the outputs of the models' own remaining
    layers (a :class:`ZippedEnsemble`); None zips every group and returns a module of the
    inputs' architecture. ``alpha``: the factor on a merged feature's correlations (repeat
    merges; ``<= 0`` forbids them); ``beta``: the same-model merge budget. Returns a new module;
    no input is modified."""
    return zip_with_maps(models, data, stop_at=stop_at, alpha=alpha, beta=beta)[0]


# -- transformers ---------------------------------------------------------------------------


def _hf_features(model: nn.Module, spec: PermutationSpec, batch: Any) -> dict[str, torch.Tensor]:
    """``{group: (tokens, units, block)}`` features of one batch: the residual stream is every
    hidden state the model returns (the embeddings' output and each layer's, stacked as more
    tokens), any other group the input of its first consumer (FFN units: the down projection's
    input; heads: the output projection's input, ``head_dim`` features per query head).
    Padded tokens (``attention_mask == 0``) are dropped."""
    batch = batch if isinstance(batch, dict) else {"input_ids": batch}
    mask = attention_mask(batch)

    def real(z: torch.Tensor) -> torch.Tensor:
        return real_tokens(z, mask).reshape(-1, z.shape[-1])  # (real tokens, features)

    points = {g.name: (g.consumers[0], "in") for g in spec.groups if g.name != "residual"}
    with hooked(model, points) as seen:
        out = model(**batch, output_hidden_states=True)
    feats = {}
    for group in spec.groups:
        if group.name == "residual":
            z = torch.cat([real(h) for h in out.hidden_states])  # (tokens * states, hidden)
            feats[group.name] = z.reshape(z.shape[0], group.size, 1)
            continue
        member = next(m for m in group.members if _is_input(group, m))
        z = real(seen[group.name])
        if z.shape[-1] != group.size * member.block:
            raise AlignError(
                f"group '{group.name}': the input of {group.consumers[0]} has {z.shape[-1]} "
                f"features, expected {group.size} units of {member.block}."
            )
        feats[group.name] = z.reshape(z.shape[0], group.size, member.block)
    return feats


def _hf_correlations(
    models: Sequence[nn.Module], spec: PermutationSpec, data: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """``{group: (Kn, Kn)}`` unit correlations: for units made of ``block`` features (a head)
    the mean over ``f`` of the correlation of feature ``f`` of one unit with feature ``f`` of
    the other (heads are compared dimension by dimension, in their own order)."""
    sums: dict[str, list] = {g.name: [0, 0.0, 0.0] for g in spec.groups}  # n, Σz, Σ z_i z_j
    with evaluating(*models):
        for batch in data:
            seen = [_hf_features(model, spec, batch) for model in models]
            for group in spec.groups:
                f = torch.cat([z[group.name] for z in seen], 1).to(torch.float64)
                s = sums[group.name]  # f: (tokens, K * units, block)
                s[0] += f.shape[0]
                s[1] = s[1] + f.sum(0)  # (Kn, block)
                s[2] = s[2] + torch.einsum("tib,tjb->ijb", f, f)  # (Kn, Kn, block)
    if spec.groups and min(s[0] for s in sums.values()) < 2:
        raise DataError("ZipIt needs calibration data with at least 2 (unpadded) tokens.")
    out = {}
    for name, (count, total, outer) in sums.items():
        mean = total / count  # (Kn, block)
        cov = outer / count - mean[:, None, :] * mean[None, :, :]
        std = cov.diagonal(dim1=0, dim2=1).T.clamp_min(0).sqrt()  # (Kn, block)
        out[name] = (cov / (std[:, None, :] * std[None, :, :] + _EPS)).mean(-1)
    return out


def zip_transformers(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    heads: bool = True,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Zip Hugging Face transformers of one config (ZipIt!, see the module docstring) into one
    model of that config; returns it and the merge matrices ``{group: M (n × Kn)}``.

    The groups are :func:`~brickwork.align.ot_fusion.hf_fusion_spec` with the residual stream:
    the stream is *one* group zipped once for the whole model (every block adds into it, so its
    features must be merged the same way everywhere: embeddings, every norm, every projection
    reading or writing it, the LM head), the FFN units and the attention heads (whole KV
    groups, as blocks; ``heads=False`` leaves heads unmerged: averaged in place) per layer.
    Norm weights and biases are merged by ``M`` like any
    producer. The result is an approximation, not any input's function: a merged unit of a
    non-linearity (SwiGLU, GELU, softmax attention, a norm's statistics over merged features)
    is not the merge of the units' outputs; only two models whose units correspond exactly
    (a permuted copy) give the model back. Full zipping only (no ``stop_at``). Memory: the
    correlation sums of every group are held at once (``(2 · ffn)²`` float64 per layer's FFN
    for two models), so this is meant for small models."""
    from brickwork.align.api import _common_spec
    from brickwork.align.ot_fusion import hf_fusion_spec

    models = list(models)
    if len(models) < 2:
        raise AlignError(f"zipit needs at least 2 models; got {len(models)}.")
    if data is None:
        raise DataError("zipit needs calibration data: pass data=[batch, ...].")
    keys = models[0].state_dict().keys()
    spec = hf_fusion_spec(models[0].config, keys, residual=True, heads=heads, output_stream=True)
    for other in models[1:]:
        _common_spec(models[0], other, spec)  # same tensors and shapes
    corr = _hf_correlations(models, spec, data)
    mats = {g.name: match(corr[g.name], len(models), alpha=alpha, beta=beta) for g in spec.groups}
    states = _zip_states([m.state_dict() for m in models], spec, mats)
    merged = _mean_state(states)
    first_of: dict[int, str] = {}  # storage -> first name (tied weights keep the first's value)
    for name, value in models[0].state_dict().items():
        tied = first_of.setdefault(value.untyped_storage().data_ptr(), name)
        if tied != name and value.is_floating_point():
            merged[name] = merged[tied]
    out = copy.deepcopy(models[0])
    out.load_state_dict(merged)
    return out, {name: m.to(torch.float32) for name, (m, _) in mats.items()}
