"""Permutation specs derived from the module graph, not written by hand.

A *permutation group* is a set of hidden units whose order can be changed without changing
the function the network computes: permuting them means permuting every ``(tensor, axis)``
pair that indexes them, all with the same permutation. For a feed-forward network the groups
are the hidden layers: between ``nn.Linear`` *i* and ``nn.Linear`` *i+1*, with only
element-wise functions and per-unit normalisations in between, the group holds

- Linear *i*'s ``weight`` axis 0 and ``bias`` axis 0,
- every ``nn.BatchNorm1d``'s ``weight``, ``bias``, ``running_mean``, ``running_var`` and every
  ``nn.LayerNorm``'s ``weight``, ``bias`` (LayerNorm mixes units only through their mean and
  variance, which do not depend on their order),
- Linear *i+1*'s ``weight`` axis 1.

The spec is found by tracing the module with :func:`torch.fx.symbolic_trace` and following
which group the last dimension of every intermediate tensor carries. Anything that touches a
permuted tensor and is not known to commute with the permutation (a reshape, a residual add,
a softmax, an unknown module) is an :class:`~brickwork.errors.AlignError` naming the node and
the module it sits in. Tensors that carry no permutation (the model's input, before the
first Linear) may be reshaped freely, so ``nn.Flatten`` in front of an MLP is fine.

The final Linear's outputs are the model's outputs and are never permuted.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from brickwork.errors import AlignError

# Modules and functions that act on each unit independently (and identically), so they commute
# with any permutation of the units.
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.SiLU,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Identity,
    nn.Dropout,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    F.relu,
    F.gelu,
    F.silu,
    F.tanh,
    F.sigmoid,
    F.leaky_relu,
    F.elu,
    F.dropout,
}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid"}
# Per-unit normalisations: their parameters and buffers permute with the group.
_NORM_TENSORS = {
    nn.BatchNorm1d: ("weight", "bias", "running_mean", "running_var"),
    nn.LayerNorm: ("weight", "bias"),
}
_SUPPORTED = "nn.Linear, nn.BatchNorm1d, nn.LayerNorm and element-wise activations"


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


class _Open:
    """A group being built while the trace is walked."""

    def __init__(self, name: str, size: int, members: list[Member]) -> None:
        self.name = name
        self.size = size
        self.members = members
        self.consumers: list[str] = []
        self.producers: list[str] = [name]
        self.reaches_output = False


def _where(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    owners = [f"'{path}' ({cls.__name__})" for path, cls in stack.values()]
    inside = f" inside module {owners[-1]}" if owners else ""
    return f"node '{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)}){inside}"


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _is_elementwise_call(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """Derive the permutation groups of a feed-forward ``model`` by tracing it with torch.fx.

    Raises :class:`~brickwork.errors.AlignError` naming the first node that touches a permuted
    tensor and is not known to commute with the permutation."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # torch.fx raises many types for untraceable code
        raise AlignError(
            f"cannot trace {type(model).__name__} with torch.fx to derive its permutation "
            f"spec: {exc}. Alignment supports models built from {_SUPPORTED}."
        ) from exc
    modules = dict(model.named_modules())
    state: dict[torch.fx.Node, _Open | None] = {}  # group carried by the last dim, or None
    groups: list[_Open] = []

    for node in graph.nodes:
        inputs = _tensor_args(node)
        carried = [state.get(n) for n in inputs if state.get(n) is not None]
        if node.op in ("placeholder", "get_attr"):
            state[node] = None
            continue
        if node.op == "output":
            for group in carried:
                group.reaches_output = True
            continue
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, nn.Linear):
                if any(g.name == node.target for g in groups):
                    raise AlignError(
                        f"cannot derive a permutation spec: {_where(node)} calls Linear "
                        f"'{node.target}' a second time; a module shared between positions "
                        "cannot have one permutation per position."
                    )
                group = carried[0] if carried else None
                if group is not None:
                    group.members.append(Member(f"{node.target}.weight", 1))
                    group.consumers.append(node.target)
                members = [Member(f"{node.target}.weight", 0)]
                if module.bias is not None:
                    members.append(Member(f"{node.target}.bias", 0))
                new = _Open(node.target, module.out_features, members)
                groups.append(new)
                state[node] = new
                continue
            if isinstance(module, _ELEMENTWISE_MODULES):
                state[node] = carried[0] if carried else None
                continue
            norm = next((t for cls, t in _NORM_TENSORS.items() if isinstance(module, cls)), None)
            if norm is not None:
                group = carried[0] if carried else None
                if group is not None:
                    _add_norm(node, module, norm, group)
                    _norm_after_producer(node, module, group)
                state[node] = group
                continue
        elif _is_elementwise_call(node):
            state[node] = carried[0] if carried else None
            continue
        if carried:
            kind = (
                "a residual add"
                if node.target in (operator.add, torch.add, operator.iadd, "add")
                else "an operation"
            )
            if node.op == "call_module":
                kind = f"a {type(modules[node.target]).__name__} module"
            raise AlignError(
                f"cannot derive a permutation spec: {_where(node)} is {kind} that acts on the "
                f"hidden units of '{carried[0].name}' and is not known to commute with a "
                f"permutation of them. Supported between Linear layers: {_SUPPORTED}."
            )
        state[node] = None  # acts on unpermuted tensors only (e.g. flatten of the input)

    kept = [g for g in groups if g.consumers and not g.reaches_output]
    return PermutationSpec(
        tuple(
            PermutationGroup(
                g.name, g.size, tuple(g.members), tuple(g.consumers), tuple(g.producers)
            )
            for g in kept
        )
    )


def _norm_after_producer(node: torch.fx.Node, module: nn.Module, group: _Open) -> None:
    """A norm with a per-unit affine that directly (and only) reads a producer's output
    becomes the group's producer in its place: REPAIR corrects the statistics after it."""
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node) or source.op != "call_module":
        return
    affine = (
        getattr(module, "weight", None) is not None and getattr(module, "bias", None) is not None
    )
    if affine and source.target in group.producers and len(source.users) == 1:
        group.producers[group.producers.index(source.target)] = node.target


def _add_norm(node: torch.fx.Node, module: nn.Module, tensors: tuple[str, ...], group: _Open):
    size = (
        module.num_features
        if isinstance(module, nn.BatchNorm1d)
        else (module.normalized_shape[-1] if len(module.normalized_shape) == 1 else None)
    )
    if size != group.size:
        raise AlignError(
            f"cannot derive a permutation spec: {_where(node)} normalises "
            f"{getattr(module, 'normalized_shape', size)} but the hidden units of "
            f"'{group.name}' are {group.size}; only a norm over exactly those units permutes "
            "with them."
        )
    for attr in tensors:
        if getattr(module, attr, None) is not None:
            group.members.append(Member(f"{node.target}.{attr}", 0))


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
