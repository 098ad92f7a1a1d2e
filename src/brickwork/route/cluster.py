"""Balanced k-means: ``n`` points into ``k`` clusters of exactly ``n / k`` points each.

Used by MoEfication to split an FFN's hidden neurons into equal-size experts. Lloyd's
iterations, with the usual nearest-centroid step replaced by a capacity-constrained
assignment (:func:`balanced_assign`): every cluster takes exactly ``n / k`` points.
"""

from __future__ import annotations

import torch

from ..errors import RecipeError


def balanced_assign(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row of ``cost`` (n, k) to one column, each column taking ``capacity`` rows.

    Greedy and vectorised: in each round every unassigned point proposes to its cheapest
    column that still has room, and each column accepts its cheapest proposals up to its
    remaining room. A full column drops out; at most ``k`` rounds. Returns (n,) int64 labels.
    Not the exact minimum-cost assignment (that is a linear assignment problem of size n),
    but close to it and O(n k log n), fast enough for FFNs with tens of thousands of neurons.
    """
    n, k = cost.shape
    if n != capacity * k:
        raise RecipeError(f"balanced_assign: {n} points do not fill {k} clusters of {capacity}.")
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    cost = cost.detach().float().cpu().clone()
    while bool((labels < 0).any()):
        free = (labels < 0).nonzero().squeeze(1)  # (f,) unassigned points
        c = cost[free]  # (f, k)
        c[:, room == 0] = float("inf")
        best = c.argmin(dim=1)  # (f,) each free point's cheapest open column
        best_cost = c.gather(1, best[:, None]).squeeze(1)
        for col in best.unique().tolist():
            mine = free[best == col]
            order = best_cost[best == col].argsort(stable=True)
            take = mine[order[: int(room[col])]]
            labels[take] = col
            room[col] -= len(take)
    return labels


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: (k, dim) centroids drawn from ``x`` (n, dim)."""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=g))]
    d2 = ((x - x[idx[0]]) ** 2).sum(1)  # (n,)
    for _ in range(1, k):
        p = d2.clamp_min(0)
        i = int(torch.multinomial(p / p.sum(), 1, generator=g)) if p.sum() > 0 else len(idx)
        idx.append(i)
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return x[idx].clone()


def balanced_kmeans(x: torch.Tensor, k: int, *, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of ``x`` (n, dim) into ``k`` clusters of exactly ``n / k`` rows.

    Returns (n,) int64 labels in [0, k); every label occurs ``n / k`` times. Deterministic
    for a given ``seed``.
    """
    n = x.shape[0]
    if k < 1 or n % k:
        raise RecipeError(
            f"balanced k-means: {n} neurons cannot be split into {k} equal experts; choose "
            f"n_experts among the divisors of {n}: "
            f"{', '.join(str(d) for d in range(1, n + 1) if n % d == 0)}."
        )
    x = x.detach().float().cpu()
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    centroids = _kmeans_pp(x, k, g)  # (k, dim)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        cost = torch.cdist(x, centroids) ** 2  # (n, k)
        new = balanced_assign(cost, n // k)
        if bool((new == labels).all()):
            break
        labels = new
        centroids = torch.zeros_like(centroids).index_add_(0, labels, x) / (n // k)
    return labels
