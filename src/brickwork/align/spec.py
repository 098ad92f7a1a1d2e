"""Permutation specs derived from the module graph, not written by hand.

A *permutation group* is a set of hidden units whose order can be changed without changing
the function the network computes: permuting them means permuting every ``(tensor, axis)``
pair that indexes them, all with the same permutation. The spec is found by tracing the module
with :func:`torch.fx.symbolic_trace` and following, for every intermediate tensor, which group
its units belong to and along which dim they lie (channels: dim 1 of a conv activation
``(N, C, H, W)``; features: the last dim of a Linear's output). A group holds

- its producer's ``weight`` axis 0 and ``bias`` (``nn.Linear``, ``nn.Conv1d/2d/3d`` with
  ``groups=1``),
- every norm over exactly those units: ``BatchNorm1d/2d/3d`` (``weight``, ``bias``,
  ``running_mean``, ``running_var``), ``LayerNorm`` over the last dim and ``GroupNorm``
  (``weight``, ``bias``). A GroupNorm with ``1 < num_groups < C`` only commutes with
  permutations that keep channels inside their norm group, so the group's unit becomes one norm
  group: ``size = C / (C // num_groups)`` units of ``C // num_groups`` consecutive channels
  (every member gets ``block *= C // num_groups``),
- a depthwise conv (``groups == in_channels == out_channels``) on the units: its ``weight``
  axis 0 and ``bias`` (channel ``c`` out is filter ``c`` of channel ``c`` in); any other
  grouped conv is an error,
- its consumers' ``weight`` axis 1: a Linear or a ``groups=1`` conv. A conv activation
  flattened (``torch.flatten(x, 1)``, ``nn.Flatten()``, ``x.view(x.size(0), -1)``) is
  channel-major, so the Linear reading it gets ``block = H * W`` (its ``in_features / C``; no
  example input is needed).

Between them, element-wise activations, dropout, per-channel pooling (``MaxPool``, ``AvgPool``,
``AdaptiveAvgPool``, ``x.mean((2, 3))``) and flatten / reduce over other dims keep the group.
An element-wise op of two tensors (``a + b``, ``a * b``) whose units come from two groups
merges them into one (union-find): every block adding into a residual stream, the stem, the
identity shortcuts and the 1x1-conv downsample shortcuts all share one permutation. The merged
group is named after its earliest producer and lists every producer and consumer. Adding a
permuted tensor to an unpermuted one (a constant, a buffer, the raw input) is an error, as is
anything else that touches a permuted tensor and is not known to commute with the permutation
(a reshape, a softmax, an unknown module): an :class:`~brickwork.errors.AlignError` naming the
node and the module it sits in. Tensors that carry no permutation (the model's input, before
the first Linear / Conv) may be reshaped freely, so ``nn.Flatten`` in front of an MLP is fine.

Units that reach the model's output (the final layer's outputs, or a residual stream returned
as is) are never permuted. ``producers`` (for REPAIR, :mod:`brickwork.align.repair`) are the
Linear / Conv modules writing a group's units, each replaced by the norm that directly and only
reads it when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn


class Member(NamedTuple):
    """One ``(tensor, axis)`` that a group's units index.

    Unit ``i`` of the group occupies the ``block`` consecutive indices starting at
    ``offset + i * block`` along ``axis``; indices outside ``[offset, offset + size * block)``
    do not move with this group. ``block > 1`` is a unit made of several indices (an attention
    head of ``head_dim`` rows, a conv channel flattened with its ``H * W`` pixels);
    ``offset > 0`` a group that owns one slice of an axis (the K rows of a fused QKV matrix)."""

    tensor: str
    axis: int
    block: int = 1
    offset: int = 0


def unit_index(member: Member, size: int, perm: torch.Tensor, length: int) -> torch.Tensor:
    """The full index along ``member.axis`` (of ``length`` entries) that moves the member's
    units by ``perm`` (new unit ``i`` is old unit ``perm[i]``) and leaves the rest in place."""
    index = torch.arange(length)
    span = member.offset + (perm.view(-1, 1) * member.block + torch.arange(member.block))
    index[member.offset : member.offset + size * member.block] = span.reshape(-1)
    return index


def unit_view(tensor: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """The member's slice of ``tensor`` as ``(size, everything else)``: row ``i`` is unit ``i``
    (its ``block`` indices along the axis, and every other axis)."""
    moved = tensor.movedim(member.axis, 0)
    part = moved[member.offset : member.offset + size * member.block]
    return part.reshape(size, -1)


@dataclass(frozen=True)
class PermutationGroup:
    """One set of hidden units that permute together.

    ``name`` is the module that produces the units (the Linear whose output axis 0 they are),
    ``size`` the number of units, ``members`` the ``(state-dict name, axis)`` pairs that move
    with them, and ``consumers`` the Linear modules that read them (their input, seen by a
    forward pre-hook, is the group's activations after the activation function).

    ``parent`` makes the group *nested*: it permutes indices inside the units of another group
    (e.g. the dimensions of one attention head inside the head group). Groups are applied in
    the order of :attr:`PermutationSpec.groups` and a parent always comes before its children,
    so a child's member offsets are positions in *target* coordinates, after the parent's
    permutation: the child of head position ``h`` acts on whichever head now sits at ``h``."""

    name: str
    size: int
    members: tuple[Member, ...]
    consumers: tuple[str, ...]
    # the modules whose outputs are the group's pre-activations, one per Linear / Conv that
    # writes the units: that module, or the norm right after it when there is one (REPAIR)
    producers: tuple[str, ...] = ()
    parent: str | None = None


@dataclass(frozen=True)
class PermutationSpec:
    groups: tuple[PermutationGroup, ...]

    def __getitem__(self, name: str) -> PermutationGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def members_of(self) -> dict[str, list[tuple[PermutationGroup, Member]]]:
        """``{tensor name: [(group, member), ...]}`` for every permuted tensor, in the order
        the groups are applied (the order of ``groups``)."""
        out: dict[str, list[tuple[PermutationGroup, Member]]] = {}
        for group in self.groups:
            for member in group.members:
                out.setdefault(member.tensor, []).append((group, member))
        return out


def permute_tensor(
    tensor: torch.Tensor,
    moves: list[tuple[PermutationGroup, Member]],
    perms: dict[str, torch.Tensor],
    *,
    skip: str | None = None,
) -> torch.Tensor:
    """``tensor`` with every ``(group, member)`` move applied in order (``skip``: one group left
    out, as weight matching does for the group it is solving)."""
    for group, member in moves:
        if group.name == skip:
            continue
        length = tensor.shape[member.axis]
        index = unit_index(member, group.size, perms[group.name].cpu(), length)
        tensor = tensor.index_select(member.axis, index.to(tensor.device))
    return tensor


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """Derive the permutation groups of ``model`` by tracing it with torch.fx (see the module
    docstring for what is supported).

    Raises :class:`~brickwork.errors.AlignError` naming the first node that touches a permuted
    tensor and is not known to commute with the permutation."""
    from brickwork.align.fx_spec import trace  # the tracer imports this module's types

    return trace(model)


def apply_permutations(
    state_dict: dict[str, torch.Tensor],
    spec: PermutationSpec,
    perms: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Return a new state dict with every group's units reordered: along each member axis,
    new unit ``i`` is old unit ``perms[group][i]``. The input is not modified; tensors of no
    group are copied too, so the result shares no storage with it."""
    moves = spec.members_of()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        out[name] = permute_tensor(tensor, moves[name], perms) if name in moves else tensor.clone()
    return out
