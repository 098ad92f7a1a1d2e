"""Activation matching: pair B's hidden units with A's by how their activations correlate.

Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
ICLR 2023 (arXiv:2209.04836), §3.1. Run both models on the same calibration batches, collect
each group's hidden activations Z_a, Z_b (n examples × d units), and for each group solve

    max_P  Σ_i corr(Z_a[:, i], Z_b[:, P(i)])

with ``linear_sum_assignment`` on the (d × d) correlation matrix. The groups are independent,
so there is one assignment per group and no iteration.

The activations are read by a forward pre-hook on every module that *consumes* the group (a
Linear or a conv): its input is the output of the layer that produced the units, after the
activation function (and any norm). A Linear's input is read as ``(examples, features)`` over
every dim but the last; a conv's as ``(N * H * W, C)`` (every position an example). Where a
unit spans ``block`` consecutive features (a flattened conv channel, a GroupNorm group) the
unit-to-unit similarity is the sum of the correlations of corresponding features,
``Σ_r corr(a[i * block + r], b[j * block + r])``. A group read by several consumers (a residual
stream: every block's first conv and downsample shortcut, the head) gets the mean of their
similarity matrices. Both models are run in eval mode under ``torch.no_grad``, and their train/eval
flags are restored afterwards, so neither is modified.

Units that are constant on the calibration data (e.g. dead ReLUs) have no correlation with
anything and cannot be told apart: the assignment among them is arbitrary. It keeps B's
function (any permutation does) but need not match A's order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from brickwork.align.calibration import cross_moments, hooked, run_batch
from brickwork.align.spec import PermutationSpec
from brickwork.align.weight_matching import linear_assignment
from brickwork.errors import DataError


def _read(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A consumer's input as ``(examples, features)``."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        x = x.movedim(1, -1)  # (N, ..., C): every position is an example
    return x.reshape(-1, x.shape[-1])


def _collect(
    model: nn.Module, spec: PermutationSpec, batch: Any
) -> dict[tuple[str, str], torch.Tensor]:
    """``{(group, consumer): its input as (examples, features)}`` for one batch."""
    modules = dict(model.named_modules())
    points = {(g.name, c): (c, "in") for g in spec.groups for c in g.consumers}
    with hooked(model, points) as seen:
        run_batch(model, batch)
    return {key: _read(modules[key[1]], z) for key, z in seen.items()}


def _block(spec: PermutationSpec, group: str, consumer: str) -> int:
    for member in spec[group].members:
        if member.tensor == f"{consumer}.weight" and member.axis == 1:
            return member.block
    return 1


def _similarity(corr: torch.Tensor, size: int, block: int) -> torch.Tensor:
    """(size * block)² feature correlations -> (size, size) unit similarity: the sum over
    ``r`` of corr[i * block + r, j * block + r]."""
    if block == 1:
        return corr
    return corr.view(size, block, size, block).diagonal(dim1=1, dim2=3).sum(-1)


def activation_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
) -> dict[str, torch.Tensor]:
    """Permutations of B's groups that maximise the correlation of its activations with A's.

    ``data`` is an iterable of batches; a batch is passed as ``model(batch)``, a tuple/list as
    ``model(*batch)`` and a dict as ``model(**batch)``."""
    keys = [(g.name, c) for g in spec.groups for c in g.consumers]
    moments = cross_moments(
        model_a, model_b, data, keys, lambda model, batch: _collect(model, spec, batch)
    )
    if not spec.groups:
        return {}
    if any(m.n < 2 for m in moments.values()):
        raise DataError(
            "activation matching needs calibration data with at least 2 examples; "
            f"got {min(m.n for m in moments.values())}. Pass data=[batch, ...]."
        )
    perms = {}
    for g in spec.groups:
        sims = [
            _similarity(moments[g.name, c].correlation(), g.size, _block(spec, g.name, c))
            for c in g.consumers
        ]
        perms[g.name] = linear_assignment(torch.stack(sims).mean(0))
    return perms
