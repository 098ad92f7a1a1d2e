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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from brickwork.align.spec import PermutationSpec, permute_tensor, unit_view

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
        from brickwork.errors import AlignError

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


def _similarity(
    spec: PermutationSpec,
    group: str,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    perms: dict[str, torch.Tensor],
) -> torch.Tensor:
    moves = spec.members_of()
    g = spec[group]
    sim = torch.zeros(g.size, g.size, dtype=torch.float64)
    for member in g.members:
        w_a = unit_view(_f64(sd_a[member.tensor]), member, g.size)  # (units, rest)
        w_b = permute_tensor(_f64(sd_b[member.tensor]), moves[member.tensor], perms, skip=group)
        sim += w_a @ unit_view(w_b, member, g.size).T  # (units of A, units of B)
    return sim


def objective(
    spec: PermutationSpec,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    perms: dict[str, torch.Tensor],
) -> float:
    """``Σ ⟨W_a, π(W_b)⟩`` over every tensor of a group (the others do not depend on π)."""
    total = 0.0
    for name, moves in spec.members_of().items():
        w_b = permute_tensor(_f64(sd_b[name]), moves, perms)
        total += float((_f64(sd_a[name]) * w_b).sum())
    return total


def weight_matching(
    spec: PermutationSpec,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    *,
    seed: int = 0,
    max_iter: int = 100,
) -> WeightMatchingResult:
    """Permutations of B's groups that maximise the weight inner product with A (see module)."""
    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    result = WeightMatchingResult(perms, [objective(spec, sd_a, sd_b, perms)])
    rng = np.random.default_rng(seed)
    names = [g.name for g in spec.groups]
    for _ in range(max_iter):
        improved = False
        for index in rng.permutation(len(names)):
            group = names[index]
            sim = _similarity(spec, group, sd_a, sd_b, perms)
            new = linear_assignment(sim)
            units = torch.arange(len(new))
            old_score = float(sim[units, perms[group]].sum())
            new_score = float(sim[units, new].sum())
            if new_score > old_score + _RTOL * max(abs(old_score), 1.0):
                perms[group] = new
                improved = True
        result.iterations += 1
        result.objective.append(objective(spec, sd_a, sd_b, perms))
        if not improved:
            break
    return result
