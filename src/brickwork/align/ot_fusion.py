"""Optimal-transport fusion: transport one model's hidden units onto another's and average.

Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020 (arXiv:1910.05653), §4.
Layer by layer, in the order of the permutation groups (:func:`~brickwork.align.spec.
permutation_spec`), the units of the source model B are transported onto those of the target A:

1. **Incoming weights aligned.** Every tensor that produces group ``g`` (the Linear's weight
   rows and bias, the norms over its units) has its *other* axes, those of earlier groups,
   transported already: ``Ŵ_b = W_b T̂_prev`` (input axis of B's units → A's units).
2. **Ground cost** ``C[j, i]`` between B's unit ``j`` and A's unit ``i``: the squared Euclidean
   distance of their aligned incoming weights (weight-based, no data; a producing tensor that
   also reads a group solved later, as the blocks writing into a residual stream do, is left
   out of the cost), or of their activations
   on the calibration batches (activation-based, ``data=``; the activation of a unit is the
   input of the Linear that consumes it, after the activation function). ``C`` is divided by
   its largest entry, so Sinkhorn's ``reg`` is relative to the largest cost.
3. **Transport map** ``T`` (``n_b × n_a``) between the marginals ``μ`` (B's units, uniform
   ``1/n_b`` unless given) and ``ν`` (A's, uniform ``1/n_a``): exact EMD (``ot.emd``, the
   network simplex) or entropic Sinkhorn (``ot.sinkhorn``, log-stabilised, ``reg``).
4. **Transport.** A's unit ``i`` receives the mass-weighted average of the B units sent to it,
   ``W̃_b = T̃ᵀ Ŵ_b`` with the column-normalised map ``T̃ = T diag(1/ν)`` (the paper's
   ``diag(1/β) Tᵀ``); the next layer reads A-ordered inputs through the row-normalised map
   ``T̂ = diag(1/μ) T``, so a B unit that was split over several A units feeds each its share.

With equal widths and uniform marginals, EMD's optimum is a vertex of the Birkhoff polytope:
``n T`` is a permutation matrix (the Hungarian solution of the same cost) and ``T̃ = T̂`` is that
permutation, so the transported B computes B's function exactly. The paper normalises the
incoming side by ``diag(1/β)`` as well; that is the same map when the widths are equal, but when
B is wider it halves the contribution of a unit that B had split in two. The row-normalised
``T̂`` keeps it, so fusing a model with a copy of itself widened by duplicating units (their
outgoing weights split) recovers the original function.

:func:`ot_fusion` averages every model transported onto the target (the paper's
``W_fused = Σ_k w_k W̃_k``). POT is imported lazily (``pip install 'brickwork[align]'``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from brickwork.align.calibration import attention_mask, evaluating, hooked, real_tokens, run_batch
from brickwork.align.spec import (
    Member,
    PermutationGroup,
    PermutationSpec,
    permutation_spec,
    unit_view,
)
from brickwork.align.weight_matching import _f64
from brickwork.errors import AlignError, DataError, unknown_name

_SOLVERS = ("emd", "sinkhorn")


@dataclass
class TransportMaps:
    """The maps of one source model onto the target, per group: ``plan`` is POT's ``T``
    (``n_source × n_target``, entries sum to 1), ``out`` its column-normalised form (applied to
    the axes that *produce* the group's units), ``inp`` its row-normalised form (applied to the
    axes that *consume* them)."""

    plan: dict[str, torch.Tensor]
    out: dict[str, torch.Tensor]
    inp: dict[str, torch.Tensor]


def _is_input(group: PermutationGroup, member: Member) -> bool:
    """Whether ``member`` is an axis that reads the group's units (a consumer's input)."""
    return member.tensor.rsplit(".", 1)[0] in group.consumers


def _contract(tensor: torch.Tensor, member: Member, size: int, matrix: torch.Tensor):
    """``tensor`` with the member's ``size`` units along ``member.axis`` mapped by ``matrix``
    (``size × new size``): new unit ``i`` = ``Σ_j matrix[j, i]`` · old unit ``j``."""
    moved = tensor.movedim(member.axis, 0)
    start, stop = member.offset, member.offset + size * member.block
    part = moved[start:stop].reshape(size, member.block, -1)  # (units, block, rest)
    part = torch.einsum("jbr,ji->ibr", part, matrix.to(part.dtype))
    part = part.reshape(-1, *moved.shape[1:])  # (new units * block, ...)
    return torch.cat([moved[:start], part, moved[stop:]]).movedim(0, member.axis)


def check_compatible(
    spec_a: PermutationSpec,
    spec_b: PermutationSpec,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
) -> None:
    """Raise unless A and B have the same layer structure: the same groups (names, members,
    consumers) and tensors whose shapes differ only along group axes (widths may differ)."""
    names_a = [(g.name, g.members, g.consumers) for g in spec_a.groups]
    names_b = [(g.name, g.members, g.consumers) for g in spec_b.groups]
    if names_a != names_b:
        raise AlignError(
            "models A and B have different layer structures: A's permutation groups are "
            f"{[(g.name, g.size) for g in spec_a.groups]}, B's "
            f"{[(g.name, g.size) for g in spec_b.groups]}. OT fusion needs the same layers "
            "(widths may differ)."
        )
    nested = [g.name for g in spec_a.groups if g.parent is not None]
    if nested:
        raise AlignError(
            f"OT fusion does not support nested permutation groups ({', '.join(nested)}); "
            "use method='weight' or 'activation' for this model."
        )
    if sd_a.keys() != sd_b.keys():
        diff = sorted(sd_a.keys() ^ sd_b.keys())
        raise AlignError(
            f"models A and B have different tensors: {', '.join(diff[:5])} "
            "exist in only one of them. OT fusion needs the same layers (widths may differ)."
        )
    moves_a, moves_b = spec_a.members_of(), spec_b.members_of()
    for name, t_a in sd_a.items():
        t_b = sd_b[name]
        fixed_a, fixed_b = list(t_a.shape), list(t_b.shape)
        for (g_a, m), (g_b, _) in zip(moves_a.get(name, []), moves_b.get(name, [])):
            fixed_a[m.axis] -= g_a.size * m.block
            fixed_b[m.axis] -= g_b.size * m.block
        if t_a.dim() != t_b.dim() or fixed_a != fixed_b:
            raise AlignError(
                f"tensor '{name}' has shape {tuple(t_a.shape)} in A and {tuple(t_b.shape)} in "
                "B, which differ along an axis that is no hidden-unit group; OT fusion can "
                "only change the widths of hidden layers."
            )


def _units(z: torch.Tensor, module: nn.Module, member: Member, size: int) -> torch.Tensor:
    """A consumer's input as ``(examples, units)``: channels of a conv input, else the units
    along the last axis (``block`` indices per unit are taken as extra examples)."""
    z = z.detach().to(torch.float64)
    if isinstance(module, nn.modules.conv._ConvNd):
        return z.movedim(1, -1).reshape(-1, size)  # (batch * positions, channels)
    if z.shape[-1] == size * member.block:
        z = z.reshape(-1, size, member.block)  # (examples, units, block)
        return z.movedim(2, 1).reshape(-1, size)
    raise AlignError(
        f"cannot read the activations of group with {size} units from the input of "
        f"{type(module).__name__} (shape {tuple(z.shape)}); use weight-based OT (data=None)."
    )


def _collect(model: nn.Module, spec: PermutationSpec, batch: Any) -> dict[str, torch.Tensor]:
    """``{group: the input of its first consumer}`` for one batch (padded tokens dropped)."""
    mask = attention_mask(batch)
    with hooked(model, {g.name: (g.consumers[0], "in") for g in spec.groups}) as seen:
        run_batch(model, batch)
    return {name: real_tokens(z, mask) for name, z in seen.items()}


def _activation_costs(
    spec_a: PermutationSpec,
    spec_b: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
) -> dict[str, torch.Tensor]:
    """``{group: (n_b, n_a) mean squared distance of the units' activations}``."""
    sums = {g.name: [0, 0.0, 0.0, 0.0] for g in spec_a.groups}  # n, |a|², |b|², b·a
    mods = {id(m): dict(m.named_modules()) for m in (model_a, model_b)}
    with evaluating(model_a, model_b):
        for batch in data:
            z_a, z_b = _collect(model_a, spec_a, batch), _collect(model_b, spec_b, batch)
            for g_a in spec_a.groups:
                g_b = spec_b[g_a.name]
                member = next(m for m in g_a.members if _is_input(g_a, m))
                consumer = g_a.consumers[0]
                a = _units(z_a[g_a.name], mods[id(model_a)][consumer], member, g_a.size)
                b = _units(z_b[g_a.name], mods[id(model_b)][consumer], member, g_b.size)
                s = sums[g_a.name]
                s[0] += a.shape[0]
                s[1] = s[1] + (a * a).sum(0)  # (n_a,)
                s[2] = s[2] + (b * b).sum(0)  # (n_b,)
                s[3] = s[3] + b.T @ a  # (n_b, n_a)
    if spec_a.groups and min(s[0] for s in sums.values()) < 1:
        raise DataError("activation-based OT fusion got no calibration examples; pass data=.")
    return {
        name: ((s[2][:, None] + s[1][None, :] - 2 * s[3]) / s[0]).clamp_min(0)
        for name, s in sums.items()
    }


def _weight_cost(
    spec_a: PermutationSpec,
    spec_b: PermutationSpec,
    name: str,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    maps: TransportMaps,
) -> torch.Tensor:
    """``(n_b, n_a)`` squared distance of the units' producing tensors, B's other axes
    transported onto A's first."""
    g_a, g_b = spec_a[name], spec_b[name]
    moves_b = spec_b.members_of()
    cost = torch.zeros(g_b.size, g_a.size, dtype=torch.float64)
    used = 0
    for member in g_a.members:
        if _is_input(g_a, member):
            continue
        others = [(o, m) for o, m in moves_b[member.tensor] if o.name != name]
        if any(o.name not in maps.out for o, _ in others):
            continue  # indexes a group not solved yet (a residual stream's later blocks)
        w_b = _f64(sd_b[member.tensor])
        for other, m in others:
            table = maps.inp if _is_input(other, m) else maps.out
            w_b = _contract(w_b, m, other.size, table[other.name])
        used += 1
        rows_a = unit_view(_f64(sd_a[member.tensor]), member, g_a.size)  # (n_a, rest)
        rows_b = unit_view(w_b, member, g_b.size)  # (n_b, rest)
        cost += (
            (rows_b * rows_b).sum(1, keepdim=True)
            + (rows_a * rows_a).sum(1)
            - 2 * (rows_b @ rows_a.T)
        )
    if not used:
        raise AlignError(
            f"weight-based OT fusion cannot compare the units of group '{name}': every tensor "
            "that produces them also reads a group that is solved later. Pass data= for "
            "activation-based OT."
        )
    return cost.clamp_min(0)


def solve(
    cost: torch.Tensor,
    *,
    solver: str = "emd",
    reg: float = 0.01,
    source: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """The transport plan ``T`` (``n_source × n_target``, float64) for ``cost`` between the
    marginals ``source`` and ``target`` (uniform when None; each must sum to 1)."""
    if solver not in _SOLVERS:
        raise unknown_name("OT solver", solver, _SOLVERS)
    try:
        import ot
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AlignError("OT fusion needs POT: pip install 'brickwork[align]' (or pot)") from exc
    n_s, n_t = cost.shape
    mu = np.full(n_s, 1.0 / n_s) if source is None else _f64(source).numpy()
    nu = np.full(n_t, 1.0 / n_t) if target is None else _f64(target).numpy()
    for label, m, n in (("source", mu, n_s), ("target", nu, n_t)):
        if m.shape != (n,) or (m < 0).any() or abs(m.sum() - 1) > 1e-6:
            raise AlignError(
                f"OT {label} marginal must be {n} non-negative masses summing to 1; got shape "
                f"{m.shape}, sum {m.sum():.6g}."
            )
    c = _f64(cost).numpy()
    top = c.max() if c.size else 0.0
    c = c / top if top > 0 else c
    if solver == "emd":
        plan = ot.emd(mu, nu, c, numItermax=10_000_000)
    else:
        if not reg > 0:
            raise AlignError(
                f"Sinkhorn needs reg > 0, got {reg}; pass e.g. reg=0.01 or solver='emd'."
            )
        plan = ot.sinkhorn(
            mu, nu, c, reg, method="sinkhorn_stabilized", numItermax=100_000, stopThr=1e-10
        )
    plan = torch.as_tensor(np.asarray(plan), dtype=torch.float64)
    if not torch.isfinite(plan).all() or plan.sum() <= 0:
        raise AlignError(
            f"the {solver} transport plan is not finite (reg={reg}); use a larger reg or "
            "solver='emd'."
        )
    return plan


def fusion_spec(model: nn.Module, *, residual: bool = False, heads: bool = True) -> PermutationSpec:
    """The spec OT fusion and ZipIt use for ``model``: the torch.fx trace of a plain module,
    or, for a Hugging Face ``PreTrainedModel``, :func:`~brickwork.align.hf_spec.
    hf_permutation_spec` without nested groups (heads as whole blocks, query heads kept in
    order inside their KV group, no within-head dimensions), with the residual stream when
    ``residual`` (``heads=False``: heads not permuted)."""
    from brickwork.align.api import _is_hf

    if _is_hf(model):
        keys = model.state_dict().keys()
        return hf_fusion_spec(model.config, keys, residual=residual, heads=heads)
    return permutation_spec(model)


def hf_fusion_spec(
    config: Any,
    names: Iterable[str],
    *,
    residual: bool = False,
    heads: bool = True,
    output_stream: bool = False,
) -> PermutationSpec:
    """:func:`~brickwork.align.hf_spec.hf_permutation_spec` of a transformer with no nested
    group: FFN units, heads as blocks (whole KV groups), the pooler, optionally the stream."""
    import dataclasses

    from brickwork.align.hf_spec import hf_permutation_spec
    from brickwork.arch.transformer import _config_dict, transformer_layout

    names = list(names)
    spec = hf_permutation_spec(
        config,
        names,
        heads=heads,
        within_head=False,
        query_heads=False,
        residual=residual,
        output_stream=output_stream,
    )
    if not residual:
        return spec
    # Every projection reading the stream is a consumer here (the spec lists one per layer
    # for the activation hooks), so that transport and zipping treat its columns as inputs.
    layout = transformer_layout(_config_dict(config), names)
    readers = [p.module for layer in layout.layers for p in (layer.k, layer.v, *layer.ffn_in)]
    if layout.mlm_decoder is not None:
        readers.append(layout.mlm_decoder.module)
    groups = tuple(
        dataclasses.replace(g, consumers=tuple(dict.fromkeys(g.consumers + tuple(readers))))
        if g.name == "residual"
        else g
        for g in spec.groups
    )
    return PermutationSpec(groups)


def transport_maps(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    data: Iterable[Any] | None = None,
    solver: str = "emd",
    reg: float = 0.01,
    marginals: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    residual: bool = False,
    heads: bool = True,
) -> tuple[PermutationSpec, PermutationSpec, TransportMaps]:
    """The transport maps of B's units onto A's, group by group (see the module docstring).

    ``marginals``: optional ``{group: (μ over B's units, ν over A's units)}``; uniform
    otherwise. Hugging Face models get :func:`fusion_spec` (``residual``: the residual stream
    too; ``heads=False``: heads not transported). Returns A's spec, B's spec and the maps."""
    if solver not in _SOLVERS:
        raise unknown_name("OT solver", solver, _SOLVERS)
    spec_a = fusion_spec(model_a, residual=residual, heads=heads)
    spec_b = fusion_spec(model_b, residual=residual, heads=heads)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    check_compatible(spec_a, spec_b, sd_a, sd_b)
    costs = None if data is None else _activation_costs(spec_a, spec_b, model_a, model_b, data)
    maps = transport_maps_of_states(
        spec_a, spec_b, sd_a, sd_b, costs=costs, solver=solver, reg=reg, marginals=marginals
    )
    return spec_a, spec_b, maps


def _solve_order(spec: PermutationSpec, sd: dict[str, torch.Tensor]) -> list[PermutationGroup]:
    """The groups in spec order, except that a group is put off while every weight matrix
    producing its units also reads an unsolved group (the residual stream, produced by the
    embeddings, is then solved before the FFNs and heads that read it). Biases and norms do
    not make a group ready: a cost from them alone is weak."""
    moves = spec.members_of()
    todo, order, solved = list(spec.groups), [], set()

    def ready(g: PermutationGroup, matrices: bool) -> bool:
        return any(
            all(o.name == g.name or o.name in solved for o, _ in moves[m.tensor])
            for m in g.members
            if not _is_input(g, m) and (not matrices or sd[m.tensor].dim() >= 2)
        )

    while todo:
        group = next((g for g in todo if ready(g, True)), None)
        group = group or next((g for g in todo if ready(g, False)), todo[0])
        todo.remove(group)
        order.append(group)
        solved.add(group.name)
    return order


def transport_maps_of_states(
    spec_a: PermutationSpec,
    spec_b: PermutationSpec,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    *,
    costs: dict[str, torch.Tensor] | None = None,
    solver: str = "emd",
    reg: float = 0.01,
    marginals: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> TransportMaps:
    """The transport maps of B's units onto A's from the specs and state dicts alone (no
    module: a checkpoint's tensors will do). ``costs``: ``{group: (n_b, n_a)}`` ground costs
    (e.g. activation-based); None computes the weight-based cost from the tensors, which then
    need to hold every tensor of the specs. Groups are solved in :func:`_solve_order`."""
    if solver not in _SOLVERS:
        raise unknown_name("OT solver", solver, _SOLVERS)
    check_compatible(spec_a, spec_b, _shapes(sd_a), _shapes(sd_b))
    unknown = sorted(set(marginals or {}) - {g.name for g in spec_a.groups})
    if unknown:
        raise AlignError(
            f"marginals given for {unknown}, which are no permutation groups; groups: "
            f"{[g.name for g in spec_a.groups]}."
        )
    maps = TransportMaps({}, {}, {})
    order = spec_a.groups if costs is not None else _solve_order(spec_a, sd_a)
    for group in order:
        name = group.name
        if costs is not None:
            cost = costs[name]
        else:
            cost = _weight_cost(spec_a, spec_b, name, sd_a, sd_b, maps)
        mu, nu = (marginals or {}).get(name, (None, None))
        plan = solve(cost, solver=solver, reg=reg, source=mu, target=nu)
        maps.plan[name] = plan
        maps.out[name] = plan / plan.sum(0, keepdim=True).clamp_min(1e-300)  # columns sum to 1
        maps.inp[name] = plan / plan.sum(1, keepdim=True).clamp_min(1e-300)  # rows sum to 1
    return maps


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins (meta tensors) for the compatibility check."""
    return {k: torch.empty(v.shape, device="meta") for k, v in sd.items()}


def plan_is_permutation(plan: torch.Tensor, *, atol: float = 1e-6) -> torch.Tensor | None:
    """``perm`` (new unit ``i`` is B's unit ``perm[i]``) when ``n · plan`` is a permutation
    matrix (square EMD plans are), else None."""
    n_b, n_a = plan.shape
    if n_b != n_a:
        return None
    scaled = plan * n_a
    perm = scaled.argmax(0)
    exact = torch.zeros_like(scaled)
    exact[perm, torch.arange(n_a)] = 1.0
    if not torch.allclose(scaled, exact, atol=atol, rtol=0) or len(set(perm.tolist())) != n_a:
        return None
    return perm


def transport_state_dict(
    sd_b: dict[str, torch.Tensor], spec_b: PermutationSpec, maps: TransportMaps
) -> dict[str, torch.Tensor]:
    """B's state dict with every group axis transported onto the target's units (new tensors,
    B's dtypes; the input is not modified)."""
    moves = spec_b.members_of()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd_b.items():
        if name not in moves or not tensor.is_floating_point():
            out[name] = tensor.detach().clone()
            continue
        t = _f64(tensor)
        for group, member in moves[name]:
            table = maps.inp if _is_input(group, member) else maps.out
            t = _contract(t, member, group.size, table[group.name])
        out[name] = t.to(tensor.dtype)
    return out


def transport(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    data: Iterable[Any] | None = None,
    solver: str = "emd",
    reg: float = 0.01,
    residual: bool = False,
    heads: bool = True,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A new module of A's architecture holding B transported onto A's units, and the plans
    ``{group: T (n_b × n_a)}``. Hugging Face models are transported over
    :func:`fusion_spec` (FFN units, heads as blocks unless ``heads=False``; ``residual``: the
    stream too). Inputs are not modified."""
    _, spec_b, maps = transport_maps(
        model_a, model_b, data=data, solver=solver, reg=reg, residual=residual, heads=heads
    )
    moved = copy.deepcopy(model_a)
    moved.load_state_dict(transport_state_dict(model_b.state_dict(), spec_b, maps))
    return moved, {k: v.to(torch.float32) for k, v in maps.plan.items()}


def ot_fusion(
    models: Sequence[nn.Module],
    *,
    target: int = 0,
    data: Iterable[Any] | None = None,
    solver: str = "emd",
    reg: float = 0.01,
    weights: Sequence[float] | None = None,
) -> nn.Module:
    """Fuse ``models`` into one of the architecture (and widths) of ``models[target]``.

    Every other model is transported onto the target layer by layer (Singh & Jaggi 2020, see
    the module docstring): weight-based ground cost when ``data`` is None, activation-based on
    the calibration batches otherwise (an iterable of batches: ``model(batch)``, a tuple as
    ``model(*batch)``, a dict as ``model(**batch)``; iterated once per source model, so pass a
    list). ``solver="emd"`` is exact OT, ``"sinkhorn"`` entropic OT with ``reg`` (relative to
    the largest ground cost). The result is ``Σ_k w_k W̃_k / Σ_k w_k`` with ``weights``
    (uniform by default); integer buffers are the target's. Returns a new module; no input
    is modified. Models may differ in the widths of their hidden layers, not in their layers.
    """
    models = list(models)
    if not models:
        raise AlignError("ot_fusion needs at least one model; got an empty sequence.")
    if not all(isinstance(m, nn.Module) for m in models):
        raise AlignError(
            "ot_fusion takes a sequence of torch nn.Module; got "
            f"{[type(m).__name__ for m in models]}."
        )
    if not -len(models) <= target < len(models):
        raise AlignError(
            f"target={target} is out of range for {len(models)} models; pass an index in "
            f"0 … {len(models) - 1}."
        )
    target %= len(models)
    if weights is None:
        weights = [1.0] * len(models)
    weights = [float(w) for w in weights]
    if len(weights) != len(models):
        raise AlignError(
            f"ot_fusion got {len(weights)} weights for {len(models)} models; pass one weight "
            "per model (or weights=None for uniform)."
        )
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise AlignError(
            f"ot_fusion weights must be finite, non-negative and not all 0; got {weights}."
        )
    if data is not None and not isinstance(data, (list, tuple)):
        data = list(data)  # iterated once per source model
    total = sum(weights)
    base = models[target]
    sd_t = base.state_dict()
    fused = {
        k: _f64(v) * (weights[target] / total) for k, v in sd_t.items() if v.is_floating_point()
    }
    for k, model in enumerate(models):
        if k == target or weights[k] == 0:
            continue
        _, spec_k, maps = transport_maps(base, model, data=data, solver=solver, reg=reg)
        moved = transport_state_dict(model.state_dict(), spec_k, maps)
        for name in fused:
            fused[name] += _f64(moved[name]) * (weights[k] / total)
    out = copy.deepcopy(base)
    out.load_state_dict(
        {k: fused[k].to(v.dtype) if k in fused else v.detach().clone() for k, v in sd_t.items()}
    )
    return out
