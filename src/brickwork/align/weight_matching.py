"""Weight matching: permute model B's hidden units so its weights are as close as possible to A's.

Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
ICLR 2023 (arXiv:2209.04836), §3.2 / Algorithm 1. The objective is

    max_π  Σ_ℓ ⟨W_a[ℓ], π(W_b)[ℓ]⟩_F

over one permutation per group. It is solved by coordinate descent: visit the groups in a
random (seeded) order; for group g, with every other group's permutation held fixed, the
objective is linear in P_g, so

    Σ_g[i, j] = Σ_{(w, axis) ∈ g} ⟨ W_a[w] unit i , π_{-g}(W_b[w]) unit j ⟩

and the best P_g is the linear assignment ``linear_sum_assignment(Σ_g, maximize=True)``.
Repeat until a whole pass improves no group (or ``max_iter`` passes). Each step can only raise
the objective, so it never decreases.

Nested groups (``PermutationGroup.parent``: the dimensions inside an attention head) act after
their parent at the target position; the parent's similarity undoes them on A's side, and a
parent is also tried jointly with its children (:func:`_joint_step`: each pair (position,
unit) is scored by the children's best assignment), kept only when the exact objective rises.
A greedy warm start (:func:`_warm_start`) solves first the groups whose similarity the others
do not disturb (e.g. the residual stream from the embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from brickwork.align.spec import (
    Member,
    PermutationGroup,
    PermutationSpec,
    permute_tensor,
    unit_index,
    unit_view,
)
from brickwork.errors import AlignError

# A step must raise its group's term by more than this (relative) to count as an improvement,
# so float round-off cannot make the descent cycle between equally good assignments.
_RTOL = 1e-12


@dataclass
class WeightMatchingResult:
    perms: dict[str, torch.Tensor]
    objective: list[float] = field(default_factory=list)  # after each pass; [0] = identity
    iterations: int = 0


def linear_assignment(similarity: torch.Tensor) -> torch.Tensor:
    """The permutation ``p`` maximising ``Σ_i similarity[i, p[i]]`` (scipy's Hungarian solver)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AlignError(
            "alignment needs scipy: pip install 'brickwork[align]' (or scipy)"
        ) from exc
    rows, cols = linear_sum_assignment(similarity.detach().cpu().numpy(), maximize=True)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.as_tensor(perm, dtype=torch.long)


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    # on the CPU, where the permutations live; float64 so ties are not round-off
    return tensor.detach().to("cpu", torch.float64)


def check_nesting(spec: PermutationSpec) -> None:
    """Every nested group's parent exists and comes before it (children act in target
    coordinates, after their parent's permutation), and nesting is one level deep."""
    seen: dict[str, PermutationGroup] = {}
    for g in spec.groups:
        if g.parent is not None:
            parent = seen.get(g.parent)
            if parent is None:
                raise AlignError(
                    f"nested group '{g.name}' names parent '{g.parent}', which is not an earlier "
                    "group of the spec; put every parent before its nested groups."
                )
            if parent.parent is not None:
                raise AlignError(
                    f"nested group '{g.name}' has parent '{g.parent}', itself nested in "
                    f"'{parent.parent}'; only one level of nesting is supported."
                )
        seen[g.name] = g


def _children(spec: PermutationSpec, group: str) -> set[str]:
    return {g.name for g in spec.groups if g.parent == group}


def _permute_except(
    tensor: torch.Tensor,
    moves: list[tuple[PermutationGroup, Member]],
    perms: dict[str, torch.Tensor],
    skip: set[str],
    axis: int,
) -> torch.Tensor:
    """``tensor`` with every move applied except those of the groups in ``skip`` along
    ``axis`` (moves along other axes commute with them and are applied)."""
    kept = [(g, m) for g, m in moves if not (g.name in skip and m.axis == axis)]
    return permute_tensor(tensor, kept, perms)


def _children_index(
    moves: list[tuple[PermutationGroup, Member]],
    perms: dict[str, torch.Tensor],
    children: set[str],
    axis: int,
    length: int,
) -> torch.Tensor | None:
    """The index ``idx`` with ``children(X) = X.index_select(axis, idx)`` (the nested groups'
    moves along ``axis``, composed in order), or ``None`` when they have none there."""
    idx = None
    for g, m in moves:
        if g.name in children and m.axis == axis:
            step = unit_index(m, g.size, perms[g.name].cpu(), length)
            idx = step if idx is None else idx[step]
    return idx


def _similarity(
    spec: PermutationSpec,
    group: str,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    perms: dict[str, torch.Tensor],
    tensors: set[str] | None = None,
) -> torch.Tensor:
    """``Σ_g[i, j]``: how much the objective gains from putting B's unit ``j`` at position ``i``.

    Nested groups (children of ``group``) act after it at the target position, so with them
    held fixed, ``⟨A, C(P(B))⟩ = ⟨C⁻¹(A), P(B)⟩``: A's units are compared after undoing the
    children's moves. A tensor with members on two axes of ``group`` (a stream-to-stream
    projection) makes the objective quadratic in P; its other axis is held at the current
    permutation (a linearisation; :func:`weight_matching` then checks the exact gain)."""
    moves = spec.members_of()
    g = spec[group]
    children = _children(spec, group)
    skip = {group} | children
    sim = torch.zeros(g.size, g.size, dtype=torch.float64)
    for member in g.members:
        if tensors is not None and member.tensor not in tensors:
            continue
        tensor_moves = moves[member.tensor]
        a = _f64(sd_a[member.tensor])
        idx = _children_index(tensor_moves, perms, children, member.axis, a.shape[member.axis])
        if idx is not None:
            a = a.index_select(member.axis, torch.argsort(idx))  # C⁻¹(A)
        w_a = unit_view(a, member, g.size)  # (units, rest)
        w_b = _permute_except(_f64(sd_b[member.tensor]), tensor_moves, perms, skip, member.axis)
        sim += w_a @ unit_view(w_b, member, g.size).T  # (units of A, units of B)
    return sim


def _family_term(
    spec: PermutationSpec,
    groups: set[str],
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    perms: dict[str, torch.Tensor],
) -> float:
    """The part of the objective that depends on the permutations of ``groups``."""
    tensors = {m.tensor for g in groups for m in spec[g].members}
    return _inner(spec, tensors, sd_a, sd_b, perms)


def _inner(
    spec: PermutationSpec,
    tensors: set[str] | None,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    perms: dict[str, torch.Tensor],
) -> float:
    """``Σ ⟨W_a, π(W_b)⟩`` over ``tensors`` (None: every tensor of a group), in spec order."""
    total = 0.0
    for name, moves in spec.members_of().items():
        if tensors is None or name in tensors:
            w_b = permute_tensor(_f64(sd_b[name]), moves, perms)
            total += float((_f64(sd_a[name]) * w_b).sum())
    return total


def _placement(spec: PermutationSpec, child: str) -> tuple[int, list[tuple[Member, Member, int]]]:
    """Where a nested group lies in its parent: the parent unit ``i`` it acts inside, and for
    each of its members the parent member on that axis and the offset inside the unit."""
    c = spec[child]
    parent = spec[c.parent]
    position, out = None, []
    for cm in c.members:
        for pm in parent.members:
            start = cm.offset - pm.offset
            if (pm.tensor, pm.axis) == (cm.tensor, cm.axis) and 0 <= start < parent.size * pm.block:
                position = start // pm.block if position is None else position
                out.append((cm, pm, start - position * pm.block))
                break
        else:
            raise AlignError(
                f"member {cm} of nested group '{child}' lies in no unit of its parent "
                f"'{c.parent}'; a nested group's members must index inside the parent's "
                "units (same tensor and axis)."
            )
    return position, out


def _joint_step(
    spec: PermutationSpec,
    group: str,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    perms: dict[str, torch.Tensor],
    *,
    force: bool = False,
) -> dict[str, torch.Tensor] | None:
    """A parent and its nested groups solved together; ``None`` unless it gains (or ``force``).

    With the children free, putting B's unit ``j`` at position ``i`` is worth the indices no
    child covers plus, for each child at ``i``, its best assignment: a linear assignment on
    the child's similarity between A's unit ``i`` and B's unit ``j`` (every other group held
    at its current permutation, the siblings at the identity). This is exact when the children
    at a position act on disjoint indices (BERT, GPT-2, MHA Llama); with grouped-query
    attention the query-head and V/O children overlap on O's columns, so the step is kept only
    if the exact objective of the family rises (which also keeps the descent monotone)."""
    g = spec[group]
    moves = spec.members_of()
    children = sorted(_children(spec, group), key=[x.name for x in spec.groups].index)
    family = {group, *children}
    identity = {**perms, **{c: torch.arange(spec[c].size) for c in children}}
    relaxed = _similarity(spec, group, sd_a, sd_b, identity)
    b_free: dict[tuple[str, int], torch.Tensor] = {}  # B without the family's moves on the axis
    best: dict[tuple[str, int], torch.Tensor] = {}
    at: dict[str, int] = {}
    for c in children:
        i, placement = _placement(spec, c)
        at[c] = i
        size = spec[c].size
        parts = []
        for cm, pm, inside in placement:
            key = (cm.tensor, cm.axis)
            if key not in b_free:
                b_free[key] = _permute_except(
                    _f64(sd_b[cm.tensor]), moves[cm.tensor], perms, family, cm.axis
                )
            w_a = unit_view(_f64(sd_a[cm.tensor]), cm, size)  # (child units of A at i, rest)
            parts.append((w_a, b_free[key], cm, pm.offset + inside, pm.block))
        for j in range(g.size):
            sim = sum(
                w_a @ unit_view(w_b, cm._replace(offset=start + j * block), size).T
                for w_a, w_b, cm, start, block in parts
            )  # (child units of A's unit i, child units of B's unit j)
            assign = linear_assignment(sim)
            units = torch.arange(len(assign))
            relaxed[i, j] += float(sim[units, assign].sum() - sim.diagonal().sum())
            best[c, j] = assign
    parent = linear_assignment(relaxed)
    trial = {**perms, group: parent, **{c: best[c, int(parent[at[c]])] for c in children}}
    old = _family_term(spec, family, sd_a, sd_b, perms)
    new = _family_term(spec, family, sd_a, sd_b, trial)
    return trial if force or new > old + _RTOL * max(abs(old), 1.0) else None


def _warm_start(
    spec: PermutationSpec,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """One greedy pass that solves first the groups whose tensors no unsolved group touches.

    From the identity, a group's similarity mixes exact terms (tensors only it permutes, e.g.
    the embeddings for the residual stream) with noise (tensors whose other axis belongs to a
    group not solved yet). This pass visits the groups in order of how many exact terms they
    have, and solves each from those terms alone (all terms when it has none), parents with
    their nested groups. :func:`weight_matching` starts from it when it beats the identity."""
    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    touching: dict[str, set[str]] = {}
    for g in spec.groups:
        for m in g.members:
            touching.setdefault(m.tensor, set()).add(g.name)
    solved: set[str] = set()
    order = [g.name for g in spec.groups]
    while len(solved) < len(order):
        ready = [n for n in order if n not in solved and (spec[n].parent in solved | {None})]
        family = {n: {n} | _children(spec, n) for n in ready}
        clean = {
            n: {m.tensor for m in spec[n].members if touching[m.tensor] <= solved | family[n]}
            for n in ready
        }
        group = max(ready, key=lambda n: len(clean[n]))
        if _children(spec, group):
            perms.update(_joint_step(spec, group, sd_a, sd_b, perms, force=True))
            solved |= family[group]
        else:
            sim = _similarity(spec, group, sd_a, sd_b, perms, clean[group] or None)
            perms[group] = linear_assignment(sim)
            solved.add(group)
    return perms


def _quadratic(spec: PermutationSpec, group: str) -> bool:
    """Whether one of the group's tensors carries the group on two axes."""
    axes: dict[str, set[int]] = {}
    for m in spec[group].members:
        axes.setdefault(m.tensor, set()).add(m.axis)
    return any(len(a) > 1 for a in axes.values())


def objective(
    spec: PermutationSpec,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    perms: dict[str, torch.Tensor],
) -> float:
    """``Σ ⟨W_a, π(W_b)⟩`` over every tensor of a group (the others do not depend on π)."""
    return _inner(spec, None, sd_a, sd_b, perms)


def weight_matching(
    spec: PermutationSpec,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    *,
    seed: int = 0,
    max_iter: int = 100,
    warm_start: bool = True,
) -> WeightMatchingResult:
    """Permutations of B's groups that maximise the weight inner product with A (see module).

    ``warm_start``: begin from :func:`_warm_start`'s greedy pass when it scores better than the
    identity (then ``objective[1]`` is its score); the descent never lowers the objective."""
    check_nesting(spec)
    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    result = WeightMatchingResult(perms, [objective(spec, sd_a, sd_b, perms)])
    rng = np.random.default_rng(seed)
    names = [g.name for g in spec.groups]
    if len(names) > 1 and warm_start:
        warm = _warm_start(spec, sd_a, sd_b)
        score = objective(spec, sd_a, sd_b, warm)
        if score > result.objective[0]:
            perms.update(warm)
            result.objective.append(score)
            result.iterations += 1  # the warm start counts as a pass
    quadratic = {name: _quadratic(spec, name) for name in names}
    nested = {name: bool(_children(spec, name)) for name in names}
    for _ in range(max_iter):
        improved = False
        for index in rng.permutation(len(names)):
            group = names[index]
            if nested[group]:
                trial = _joint_step(spec, group, sd_a, sd_b, perms)
                if trial is not None:
                    perms.update(trial)
                    improved = True
            sim = _similarity(spec, group, sd_a, sd_b, perms)
            new = linear_assignment(sim)
            if quadratic[group]:
                old_score = _family_term(spec, {group}, sd_a, sd_b, perms)
                new_score = _family_term(spec, {group}, sd_a, sd_b, {**perms, group: new})
            else:
                units = torch.arange(len(new))
                old_score = float(sim[units, perms[group]].sum())
                new_score = float(sim[units, new].sum())
            if new_score > old_score + _RTOL * max(abs(old_score), 1.0):
                perms[group] = new
                improved = True
        result.iterations += 1
        result.objective.append(objective(spec, sd_a, sd_b, perms))
        # one linear group: its assignment is already optimal, a second pass would repeat it
        if not improved or (len(names) == 1 and not quadratic[names[0]]):
            break
    return result
