"""The torch.fx tracer behind :func:`brickwork.align.spec.permutation_spec` (what it supports
is described in :mod:`brickwork.align.spec`)."""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from brickwork.align.spec import Member, PermutationGroup, PermutationSpec
from brickwork.errors import AlignError

# Modules and functions that act on each unit independently (and identically), so they commute
# with any permutation of the units.
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.Tanh,
    nn.SiLU,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Hardswish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.tanh,
    F.sigmoid,
    F.leaky_relu,
    F.elu,
    F.dropout,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "sigmoid", "contiguous", "clone"}
# element-wise ops of two tensors: both must carry the same units (they merge into one group)
_BINARY_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.mul, operator.truediv}
_BINARY_FUNCTIONS |= {torch.add, torch.sub, torch.mul}
_BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_"}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# per-channel pooling of a conv activation (N, C, ...)
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_POOL_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_SUPPORTED = (
    "nn.Linear, nn.Conv1d/2d/3d (groups=1 or depthwise), BatchNorm, LayerNorm, GroupNorm, "
    "pooling, flatten, element-wise activations and residual adds of tensors with the same units"
)


class _Open:
    """A group being built while the trace is walked (a union-find node: residual adds and
    other element-wise ops between two groups merge them into one)."""

    def __init__(self, name: str, size: int, members: list[Member], index: int) -> None:
        self.name = name
        self.size = size
        self.members = members
        self.index = index  # creation order: a merged group keeps its earliest name
        self.consumers: list[str] = []
        self.producers: list[str] = [name]
        self.reaches_output = False
        self.coarse = 1  # a GroupNorm makes units of this many channels
        self.parent: _Open = self

    def root(self) -> _Open:
        group = self
        while group.parent is not group:
            group.parent = group.parent.parent
            group = group.parent
        return group


class _Carry(NamedTuple):
    """Which group an intermediate tensor's units belong to, and where they are: along
    ``dim`` (1: channels of a conv activation, -1: the last dim of a Linear's), of a tensor of
    ``ndim`` dims (None: not known, e.g. a Linear applied to the model's input); ``block``
    indices per unit (None: a flattened ``(C, H, W)`` axis, channel-major, whose ``H * W`` the
    consuming Linear's ``in_features`` tells)."""

    group: _Open
    dim: int
    ndim: int | None
    block: int | None = 1

    @property
    def g(self) -> _Open:
        return self.group.root()

    def axis(self) -> int:
        return self.dim + self.ndim if self.dim < 0 and self.ndim is not None else self.dim

    def is_last(self) -> bool:
        return self.dim == -1 or (self.ndim is not None and self.dim == self.ndim - 1)

    def is_channel(self, legacy_2d: bool = False) -> bool:
        # legacy_2d: a Linear's output of unknown rank is taken to be (N, C), as for BatchNorm1d
        return self.dim == 1 or (self.dim == -1 and (self.ndim == 2 or legacy_2d and not self.ndim))


def _where(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    owners = [f"'{path}' ({cls.__name__})" for path, cls in stack.values()]
    inside = f" inside module {owners[-1]}" if owners else ""
    return f"node '{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)}){inside}"


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _fn(node: torch.fx.Node, functions: set[Any], methods: set[str]) -> bool:
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _is_elementwise_call(node: torch.fx.Node) -> bool:
    return _fn(node, _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS)


def _fail(node: torch.fx.Node, carry: _Carry, what: str) -> AlignError:
    return AlignError(
        f"cannot derive a permutation spec: {_where(node)} {what} (it acts on the hidden units "
        f"of '{carry.g.name}'). Supported: {_SUPPORTED}."
    )


class _Tracer:
    """Walks a torch.fx graph once, in order, building the groups (see the module docstring)."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph) -> None:
        self.modules = dict(model.named_modules())
        self.graph = graph
        self.state: dict[torch.fx.Node, _Carry | None] = {}
        self.meta: set[torch.fx.Node] = set()  # sizes / shapes read off tensors: plain numbers
        self.groups: list[_Open] = []
        self.called: set[str] = set()

    def run(self) -> PermutationSpec:
        for node in self.graph.nodes:
            self.state[node] = self.visit(node)
        roots = sorted({g.root() for g in self.groups}, key=lambda g: g.index)
        return PermutationSpec(
            tuple(_close(g) for g in roots if g.consumers and not g.reaches_output)
        )

    # ------------------------------------------------------------------ dispatch
    def visit(self, node: torch.fx.Node) -> _Carry | None:
        inputs = [n for n in _tensor_args(node) if n not in self.meta]
        carried = [self.state[n] for n in inputs if self.state.get(n) is not None]
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for carry in carried:
                carry.g.reaches_output = True
            return None
        if self.is_meta(node, inputs):
            self.meta.add(node)
            return None
        if node.op == "call_module":
            return self.module(node, self.modules[node.target], carried)
        if not carried:
            return None  # acts on unpermuted tensors only (e.g. flatten of the input)
        carry = carried[0]
        if _is_elementwise_call(node) and len(inputs) == 1:
            return carry
        if _fn(node, _BINARY_FUNCTIONS, _BINARY_METHODS):
            return self.binary(node, inputs)
        if _fn(node, _POOL_FUNCTIONS, set()):
            return self.pool(node, carry)
        if _fn(node, {torch.flatten}, {"flatten"}):
            return self.flatten(
                node, carry, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
            )
        if _fn(node, set(), {"view", "reshape"}) or node.target is torch.reshape:
            return self.reshape(node, carry)
        if _fn(node, _REDUCE_FUNCTIONS, _REDUCE_METHODS):
            return self.reduce(node, carry)
        kind = (
            "is a residual add"
            if _fn(node, _BINARY_FUNCTIONS, _BINARY_METHODS)
            else "is an operation"
        )
        raise _fail(node, carry, f"{kind} not known to commute with a permutation of its units")

    def is_meta(self, node: torch.fx.Node, inputs: list[torch.fx.Node]) -> bool:
        if node.op == "call_method" and node.target in ("size", "dim"):
            return True
        attrs = ("shape", "dtype", "device")
        if node.op == "call_function" and node.target is getattr and node.args[1] in attrs:
            return True
        # arithmetic on sizes (x.size(0) * 2, x.shape[1] ** -0.5)
        return node.op == "call_function" and bool(_tensor_args(node)) and not inputs

    def new_group(self, node: torch.fx.Node, size: int, members: list[Member]) -> _Open:
        if node.target in self.called:
            raise AlignError(
                f"cannot derive a permutation spec: {_where(node)} calls "
                f"'{node.target}' a second time; a module shared between positions "
                "cannot have one permutation per position."
            )
        self.called.add(node.target)
        group = _Open(node.target, size, members, len(self.groups))
        self.groups.append(group)
        return group

    # ------------------------------------------------------------------ modules
    def module(
        self, node: torch.fx.Node, module: nn.Module, carried: list[_Carry]
    ) -> _Carry | None:
        carry = carried[0] if carried else None
        if isinstance(module, nn.Linear):
            return self.linear(node, module, carry)
        if isinstance(module, _CONVS):
            return self.conv(node, module, carry)
        if carry is None:
            return None
        if isinstance(module, _ELEMENTWISE_MODULES):
            return carry
        if isinstance(module, _POOL_MODULES):
            return self.pool(node, carry)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, carry, module.start_dim, module.end_dim)
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            return self.norm(node, module, carry)
        raise _fail(
            node,
            carry,
            f"is a {type(module).__name__} module, not known to commute with a "
            "permutation of its units",
        )

    def consume(self, node: torch.fx.Node, carry: _Carry, block: int) -> None:
        group = carry.g
        group.members.append(Member(f"{node.target}.weight", 1, block=block))
        group.consumers.append(node.target)

    def linear(self, node: torch.fx.Node, module: nn.Linear, carry: _Carry | None) -> _Carry:
        if carry is not None:
            if not carry.is_last():
                raise _fail(
                    node,
                    carry,
                    f"reads dim {carry.dim} of {carry.ndim} as its input "
                    "features, but the units are not the last dim",
                )
            block = carry.block
            if block is None:  # a flattened (C, H, W): in_features = C * (H * W)
                if module.in_features % carry.g.size:
                    raise _fail(
                        node,
                        carry,
                        f"has in_features={module.in_features}, not a "
                        f"multiple of the {carry.g.size} flattened channels",
                    )
                block = module.in_features // carry.g.size
            if module.in_features != carry.g.size * block:
                raise _fail(
                    node,
                    carry,
                    f"has in_features={module.in_features}, expected {carry.g.size * block}",
                )
            self.consume(node, carry, block)
        members = [Member(f"{node.target}.weight", 0)]
        if module.bias is not None:
            members.append(Member(f"{node.target}.bias", 0))
        group = self.new_group(node, module.out_features, members)
        return _Carry(group, -1, carry.ndim if carry is not None else None)

    def conv(self, node: torch.fx.Node, module: nn.Module, carry: _Carry | None) -> _Carry | None:
        ndim = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}[type(module)]
        members = [Member(f"{node.target}.weight", 0)]
        if module.bias is not None:
            members.append(Member(f"{node.target}.bias", 0))
        if carry is not None and (not carry.is_channel() or carry.block != 1):
            raise _fail(
                node,
                carry,
                "reads channels from a tensor whose units are not its "
                "dim 1 (a conv expects (N, C, ...))",
            )
        if module.groups != 1:
            depthwise = module.groups == module.in_channels == module.out_channels
            if not depthwise:
                raise AlignError(
                    f"cannot derive a permutation spec: {_where(node)} is a grouped "
                    f"{type(module).__name__} (groups={module.groups}, in_channels="
                    f"{module.in_channels}, out_channels={module.out_channels}); only groups=1 "
                    "and depthwise convs (groups == in_channels == out_channels) are supported."
                )
            if carry is None:
                return None  # per-channel filter of unpermuted channels
            if node.target in self.called:
                self.new_group(node, 0, [])  # raises: called twice
            self.called.add(node.target)
            carry.g.members.extend(members)  # channel c out = filter c of channel c in
            return carry
        if carry is not None:
            self.consume(node, carry, 1)
        group = self.new_group(node, module.out_channels, members)
        return _Carry(group, 1, ndim)

    def norm(self, node: torch.fx.Node, module: nn.Module, carry: _Carry) -> _Carry:
        if isinstance(module, nn.LayerNorm):
            ok, size = (
                carry.is_last(),
                (module.normalized_shape[0] if len(module.normalized_shape) == 1 else None),
            )
            names: tuple[str, ...] = ("weight", "bias")
        else:
            ok = carry.is_channel(legacy_2d=isinstance(module, (nn.BatchNorm1d, nn.GroupNorm)))
            if isinstance(module, nn.GroupNorm):
                size, names = module.num_channels, ("weight", "bias")
            else:
                size, names = module.num_features, ("weight", "bias", "running_mean", "running_var")
        group = carry.g
        if size != group.size or not ok or carry.block != 1:
            shape = getattr(module, "normalized_shape", size)
            raise AlignError(
                f"cannot derive a permutation spec: {_where(node)} normalises {shape} "
                f"{'along the last dim' if isinstance(module, nn.LayerNorm) else 'along dim 1'} "
                f"but the hidden units of '{group.name}' are {group.size} along dim "
                f"{carry.dim}; only a norm over exactly those units permutes with them."
            )
        if isinstance(module, nn.GroupNorm) and module.num_groups not in (1, size):
            # a unit must stay inside its norm group: units become whole norm groups
            group.coarse = math.lcm(group.coarse, size // module.num_groups)
        for attr in names:
            if getattr(module, attr, None) is not None:
                group.members.append(Member(f"{node.target}.{attr}", 0))
        _norm_after_producer(node, module, group)
        return carry

    # ------------------------------------------------------------------ functions
    def binary(self, node: torch.fx.Node, inputs: list[torch.fx.Node]) -> _Carry:
        carries = [self.state.get(n) for n in inputs]
        first = next(c for c in carries if c is not None)
        for n, c in zip(inputs, carries):
            if c is None:
                raise AlignError(
                    f"cannot derive a permutation spec: {_where(node)} combines the hidden units "
                    f"of '{first.g.name}' with '{n.name}', a tensor whose units are not permuted "
                    "(a constant, a buffer or the model's input); it does not commute with a "
                    "permutation. Add only tensors that carry the same units (a residual stream)."
                )
            if (c.axis(), c.block) != (first.axis(), first.block):
                raise _fail(
                    node,
                    first,
                    f"combines units along dim {first.dim} with units of "
                    f"'{c.g.name}' along dim {c.dim}",
                )
            self.union(node, first.g, c.g)
        return first

    def union(self, node: torch.fx.Node, a: _Open, b: _Open) -> None:
        a, b = a.root(), b.root()
        if a is b:
            return
        if a.size != b.size:
            raise AlignError(
                f"cannot derive a permutation spec: {_where(node)} combines the {a.size} units "
                f"of '{a.name}' with the {b.size} units of '{b.name}'."
            )
        if b.index < a.index:
            a, b = b, a
        b.parent = a
        a.members += b.members
        a.consumers += b.consumers
        a.producers += b.producers
        a.reaches_output |= b.reaches_output
        a.coarse = math.lcm(a.coarse, b.coarse)

    def pool(self, node: torch.fx.Node, carry: _Carry) -> _Carry:
        if carry.dim != 1 or carry.ndim is None or carry.ndim < 3 or carry.block != 1:
            raise _fail(
                node,
                carry,
                "pools a tensor whose units are not channels (dim 1) of a conv activation",
            )
        return carry

    def flatten(self, node: torch.fx.Node, carry: _Carry, start: int, end: int) -> _Carry:
        if carry.ndim is None:
            raise _fail(node, carry, "flattens a tensor of unknown rank")
        start, end = start % carry.ndim, end % carry.ndim
        axis = carry.axis()
        if axis < start:
            return _Carry(carry.group, axis, carry.ndim - (end - start), carry.block)
        if axis > end:
            return _Carry(
                carry.group, axis - (end - start), carry.ndim - (end - start), carry.block
            )
        if axis != start or carry.block != 1:
            raise _fail(
                node,
                carry,
                f"flattens dims {start}..{end} with the units at dim {axis}; "
                "only flattening channels with the dims after them (channel-major) is "
                "supported",
            )
        return _Carry(carry.group, axis, carry.ndim - (end - start), None if end > start else 1)

    def reshape(self, node: torch.fx.Node, carry: _Carry) -> _Carry:
        shape = list(node.args[1:])
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = list(shape[0])
        batch = len(shape) == 2 and isinstance(shape[0], torch.fx.Node) and shape[0] in self.meta
        if batch and shape[1] == -1 and carry.ndim is not None and carry.axis() == 1:
            return self.flatten(node, carry, 1, -1)  # x.view(x.size(0), -1)
        raise _fail(
            node,
            carry,
            f"reshapes to {shape}; only x.view(x.size(0), -1) of a conv "
            "activation (or flatten) is supported",
        )

    def reduce(self, node: torch.fx.Node, carry: _Carry) -> _Carry:
        dims = _arg(node, 1, "dim")
        keep = bool(_arg(node, 2, "keepdim", False))
        if dims is None or carry.ndim is None:
            raise _fail(node, carry, "reduces over all dims or a tensor of unknown rank")
        dims = {d % carry.ndim for d in ((dims,) if isinstance(dims, int) else dims)}
        axis = carry.axis()
        if axis in dims:
            raise _fail(node, carry, "reduces over the units themselves")
        if keep:
            return carry
        return _Carry(
            carry.group, axis - sum(d < axis for d in dims), carry.ndim - len(dims), carry.block
        )


def _close(group: _Open) -> PermutationGroup:
    size, members = group.size, tuple(group.members)
    if group.coarse > 1:  # GroupNorm: a unit is one norm group of `coarse` channels
        size //= group.coarse
        members = tuple(m._replace(block=m.block * group.coarse) for m in members)
    return PermutationGroup(
        group.name, size, members, tuple(group.consumers), tuple(group.producers)
    )


def trace(model: nn.Module) -> PermutationSpec:
    """Derive the permutation groups of ``model`` by tracing it with torch.fx (see the module
    docstring for what is supported).

    Raises :class:`~brickwork.errors.AlignError` naming the first node that touches a permuted
    tensor and is not known to commute with the permutation."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # torch.fx raises many types for untraceable code
        raise AlignError(
            f"cannot trace {type(model).__name__} with torch.fx to derive its permutation "
            f"spec: {exc}. Alignment supports models built from {_SUPPORTED}."
        ) from exc
    return _Tracer(model, graph).run()


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
