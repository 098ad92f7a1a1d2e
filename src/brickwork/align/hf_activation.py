"""Activation matching for specs with block units and nested groups (transformers).

Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023 (arXiv:2209.04836), §3.1: pair B's
units with A's by the correlation of their activations on calibration data. Here a group's
activations are read where its consumers see them: for each consumer module, the member of the
group on that module's weight says whether the group indexes the module's *input* (a forward
pre-hook: FFN down-projection input, attention output-projection input, the residual stream
entering Q/K/V and the FFN) or its *output* (a forward hook: the Q and K projections, for the
shared Q/K dimensions), and which slice of the features each unit is (``offset``, ``block``).

One pass over the data accumulates, per (module, input|output), the feature cross-correlation
matrix ``C[f_a, f_b]`` between A and B (float64; padded tokens dropped when a batch is a dict
with an ``attention_mask``). The groups are then solved in spec order, each by one linear
assignment on

    sim[i, j] = Σ_members Σ_f C[feature f of A's unit i, feature f of B's unit j]

with B's features read through the permutations already chosen (so a nested group, which acts
in target coordinates after its parent, compares A's head at position ``i`` with the B head
now there). A group whose unit features a later group reorders (a head group, or the query
heads of a KV group before its V/O dimensions) scores a pair of units by the best assignment
of their features instead (a linear assignment per pair), since they are not in order yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from brickwork.align.calibration import (
    attention_mask,
    cross_moments,
    hooked,
    real_tokens,
    run_batch,
)
from brickwork.align.spec import Member, PermutationSpec, unit_index
from brickwork.align.weight_matching import linear_assignment
from brickwork.errors import AlignError, DataError

Key = tuple[str, str]  # (module name, "in" | "out")


def _in_axis(module: nn.Module) -> int:
    # HF GPT-2's Conv1D stores its weight as (in, out); nn.Linear as (out, in)
    return 0 if type(module).__name__ == "Conv1D" else 1


def _reads(
    spec: PermutationSpec, modules: dict[str, nn.Module]
) -> dict[str, list[tuple[Key, Member]]]:
    """``{group: [(key, member), ...]}``: where each group's units appear as features."""
    out: dict[str, list[tuple[Key, Member]]] = {}
    for g in spec.groups:
        found = []
        for c in g.consumers:
            if c not in modules:
                raise AlignError(
                    f"group '{g.name}' names consumer '{c}', which is no module of the model; "
                    "pass a spec derived from this model (hf_permutation_spec / spec=None)."
                )
            axis = _in_axis(modules[c])
            for m in g.members:
                if m.tensor == f"{c}.weight":
                    found.append(((c, "in" if m.axis == axis else "out"), m))
        if not found:
            raise AlignError(
                f"group '{g.name}' has no member on a consumer's weight ({g.consumers}); "
                "activation matching cannot read its units."
            )
        out[g.name] = found
    return out


def _collect(model: nn.Module, keys: set[Key], batch: Any) -> dict[Key, torch.Tensor]:
    mask = attention_mask(batch)
    with hooked(model, {key: key for key in keys}) as seen:
        run_batch(model, batch)
    return {key: real_tokens(z, mask).detach().reshape(-1, z.shape[-1]) for key, z in seen.items()}


def _refined_later(spec: PermutationSpec) -> set[tuple[str, Member]]:
    """``(group, member)`` pairs whose unit features a later group reorders further (a finer
    block on the same tensor axis): their features are not in order yet when they are solved."""
    out = set()
    for index, g in enumerate(spec.groups):
        later = [(m.tensor, m.axis, m.block) for h in spec.groups[index + 1 :] for m in h.members]
        for m in g.members:
            if any((t, a) == (m.tensor, m.axis) and b < m.block for t, a, b in later):
                out.add((g.name, m))
    return out


def _pair_scores(block_corr: torch.Tensor, size: int, block: int, nested: bool) -> torch.Tensor:
    """(size, size) unit scores from the (size*block, size*block) correlation of their features:
    the trace of each (block × block) pair, or its best assignment when ``nested``."""
    pairs = block_corr.reshape(size, block, size, block).permute(0, 2, 1, 3)  # (i, j, f_a, f_b)
    if not nested:
        return pairs.diagonal(dim1=2, dim2=3).sum(-1)
    out = torch.empty(size, size, dtype=torch.float64)
    units = torch.arange(block)
    for i in range(size):
        for j in range(size):
            out[i, j] = pairs[i, j][units, linear_assignment(pairs[i, j])].sum()
    return out


def feature_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
) -> dict[str, torch.Tensor]:
    """Permutations of B's groups from activation correlations (see the module docstring).

    ``data`` is an iterable of batches (a dict is passed as ``model(**batch)``)."""
    mods_a, mods_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    reads = _reads(spec, mods_b)
    _reads(spec, mods_a)
    keys = {key for found in reads.values() for key, _ in found}
    cross = cross_moments(
        model_a, model_b, data, keys, lambda model, batch: _collect(model, keys, batch)
    )
    if not spec.groups:
        return {}
    if min(c.n for c in cross.values()) < 2:
        raise DataError(
            "activation matching needs calibration data with at least 2 examples (tokens); "
            f"got {min(c.n for c in cross.values())}. Pass data=[batch, ...]."
        )
    corr = {key: c.correlation() for key, c in cross.items()}
    current = {key: torch.arange(c.shape[1]) for key, c in corr.items()}  # B feature at target
    refined = _refined_later(spec)
    perms: dict[str, torch.Tensor] = {}
    for g in spec.groups:
        sim = torch.zeros(g.size, g.size, dtype=torch.float64)
        for key, m in reads[g.name]:
            span = torch.arange(m.offset, m.offset + g.size * m.block)
            block_corr = corr[key][span][:, current[key][span]]
            sim += _pair_scores(block_corr, g.size, m.block, (g.name, m) in refined)
        perms[g.name] = perm = linear_assignment(sim)
        for key in keys:  # every hooked tensor the group's members index moves with it
            name, mode = key
            axis = _in_axis(mods_b[name])
            for m in g.members:
                if m.tensor == f"{name}.weight" and (m.axis == axis) == (mode == "in"):
                    index = unit_index(m, g.size, perm, len(current[key]))
                    current[key] = current[key][index]
    return perms
