"""Weight matching on checkpoints, one independent part of the spec at a time.

The objective of weight matching (Ainsworth et al. 2023, arXiv:2209.04836, §3.2) is a sum over
tensors, and a group's similarity only reads the tensors it permutes. Groups that share no
tensor (directly or through a chain of groups) therefore form independent problems: the
*components* of the graph whose nodes are the groups and whose edges are shared tensors.
Without the residual stream, a transformer's components are per layer (its FFN; its heads
with their nested groups), so :func:`weight_matching_streamed` reads one component's tensors
from the two checkpoints, solves it with :func:`~brickwork.align.weight_matching.weight_matching`
and frees them: memory stays near one layer of each model, whatever the model's size. With
the residual stream every layer joins one component and the whole model is read.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable
from typing import Any

import torch

from brickwork.align.spec import PermutationSpec
from brickwork.align.weight_matching import WeightMatchingResult, weight_matching
from brickwork.errors import AlignError


def _release_memory() -> None:
    """Give freed heap memory back to the OS between components. glibc keeps freed blocks of
    a few MB (below its adaptive mmap threshold) in its arenas, so without this the resident
    set grows by a component's temporaries with every component (measured: +140 MB per
    attention component of the 0.1B Llama)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def components(spec: PermutationSpec) -> list[PermutationSpec]:
    """The spec split into independent sub-specs (groups linked by a shared tensor or a parent),
    each in the original group order, ordered by their first group."""
    parent = {g.name: g.name for g in spec.groups}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owner: dict[str, str] = {}
    for g in spec.groups:
        if g.parent is not None:
            parent[find(g.name)] = find(g.parent)
        for m in g.members:
            if m.tensor in owner:
                parent[find(g.name)] = find(owner[m.tensor])
            else:
                owner[m.tensor] = g.name
    parts: dict[str, list] = {}
    for g in spec.groups:
        parts.setdefault(find(g.name), []).append(g)
    return [PermutationSpec(tuple(groups)) for groups in parts.values()]


def weight_matching_streamed(
    spec: PermutationSpec,
    ckpt_a: Any,
    ckpt_b: Any,
    *,
    seed: int = 0,
    max_iter: int = 100,
    progress: Callable[[int, int, PermutationSpec], None] | None = None,
) -> WeightMatchingResult:
    """Weight matching of checkpoint B onto checkpoint A, component by component.

    ``ckpt_a`` / ``ckpt_b`` are anything :func:`brickwork.checkpoint.open_checkpoint` opens
    (a model directory, a safetensors file, a state dict). Each component's tensors are read,
    converted to float64, matched and freed before the next is read. The result's
    ``objective`` is the sum over components of their objective after each pass (a component
    that converged keeps its last value); ``iterations`` is the largest number of passes."""
    from brickwork.checkpoint import open_checkpoint

    a, b = open_checkpoint(ckpt_a), open_checkpoint(ckpt_b)
    perms: dict[str, torch.Tensor] = {}
    curves: list[list[float]] = []
    iterations = 0
    parts = components(spec)
    for index, part in enumerate(parts):
        names = sorted({m.tensor for g in part.groups for m in g.members})
        missing = [n for n in names if n not in a or n not in b]
        if missing:
            raise AlignError(
                f"tensor(s) {', '.join(missing[:5])} of the permutation spec are missing from "
                f"{a.label if missing[0] not in a else b.label}; pass the spec of these checkpoints."
            )
        sd_a = {n: a.get(n).to(torch.float64) for n in names}
        sd_b = {n: b.get(n).to(torch.float64) for n in names}
        result = weight_matching(part, sd_a, sd_b, seed=seed + index, max_iter=max_iter)
        perms.update(result.perms)
        curves.append(result.objective)
        iterations = max(iterations, result.iterations)
        del sd_a, sd_b, result
        _release_memory()
        if progress is not None:
            progress(index + 1, len(parts), part)
    length = max((len(c) for c in curves), default=1)
    total = [sum(c[min(i, len(c) - 1)] for c in curves) for i in range(length)]
    return WeightMatchingResult(perms, total, iterations)
