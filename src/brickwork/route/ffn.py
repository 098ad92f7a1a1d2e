"""Where a model's feed-forward blocks are, and their weights as one dense FFN.

An FFN here is ``down(act(up(x) + b_in)) + b_out`` (``down(silu(gate(x)) * up(x))`` for
SwiGLU) spread over a model's modules: :class:`FFNSpec` names those modules, and
:func:`find_ffns` recognises Hugging Face BERT-style layers (``intermediate.dense`` ->
act -> ``output.dense``), Llama / Mistral / Qwen2 MLPs (``gate_proj``, ``up_proj``,
``down_proj``) and ``Linear -> activation -> Linear`` modules (``nn.Sequential`` or any
module with those three children, dropout and identity aside). Used by MoEfication
(:mod:`brickwork.route.moefy`) and module-level upcycling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BrickworkError, RecipeError
from .format import get_module
from .moe import _ACT  # the activations MoELayer computes, by name

_HF_ACT = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "SiLUActivation": "silu",
}


@dataclass(frozen=True)
class FFNSpec:
    """Where one FFN lives in a model (all paths are full dotted module paths).

    ``replace`` receives the FFN input and is replaced by the MoE, which computes the whole
    FFN ``down(act(up(x)))`` (``act(gate(x)) * up(x)`` for ``"swiglu"``); ``identity`` are
    the modules after it that finished the FFN and become ``nn.Identity``. A user-named pair
    ``mlp.fc1 -> mlp.act -> mlp.fc2`` inside a block whose forward calls them in turn is
    ``FFNSpec(replace="mlp.fc1", up="mlp.fc1", down="mlp.fc2", activation="gelu",
    identity=("mlp.act", "mlp.fc2"))``.
    """

    replace: str
    up: str
    down: str
    activation: str
    gate: str | None = None
    identity: tuple[str, ...] = ()


# -- finding FFNs ---------------------------------------------------------------------------
def activation_name(m: Any) -> str | None:
    """The MoELayer activation a module computes, or None when unknown."""
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.GELU):
        return "gelu" if m.approximate == "none" else "gelu_tanh"
    if isinstance(m, nn.SiLU):
        return "silu"
    return _HF_ACT.get(type(m).__name__)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


_SUPPORTED = "gelu, gelu_tanh (gelu_new, gelu_pytorch_tanh), relu, silu; swiglu for gated MLPs"


def _classify(m: nn.Module, path: str) -> FFNSpec | str | None:
    """``m`` (at ``path``) as an FFN; a string says why an FFN-shaped module is not supported."""
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(
        getattr(out, "dense", None), nn.Linear
    ):
        fn = getattr(inter, "intermediate_act_fn", None)
        act = activation_name(fn)
        if act is None:
            return f"'{path}': BERT-style FFN with activation {type(fn).__name__}"
        dense = _join(path, "output.dense")
        return FFNSpec(_join(path, "intermediate"), _join(path, "intermediate.dense"),
                       dense, act, identity=(dense,))  # fmt: skip
    glu = ("gate_proj", "up_proj", "down_proj")
    if all(isinstance(getattr(m, n, None), nn.Linear) for n in glu):
        fn = getattr(m, "act_fn", None)
        if activation_name(fn) != "silu":
            return f"'{path}': gated MLP with activation {type(fn).__name__} (not SwiGLU)"
        p = {n: _join(path, n) for n in glu}
        return FFNSpec(path, p["up_proj"], p["down_proj"], "swiglu", gate=p["gate_proj"])
    kids = [(n, c) for n, c in m.named_children() if not isinstance(c, nn.Dropout | nn.Identity)]
    if len(kids) == 3 and isinstance(kids[0][1], nn.Linear) and isinstance(kids[2][1], nn.Linear):
        act = activation_name(kids[1][1])
        up, down = kids[0][1], kids[2][1]
        if up.out_features == down.in_features and up.in_features == down.out_features:
            if act is None:
                return f"'{path}': Linear -> {type(kids[1][1]).__name__} -> Linear"
            return FFNSpec(path, _join(path, kids[0][0]), _join(path, kids[2][0]), act)
    return None


def find_ffns(model: nn.Module, paths: Sequence[str | FFNSpec] | None = None) -> list[FFNSpec]:
    """The FFNs of ``model``: every recognised one (``paths=None``), or the named ones.

    An FFN-shaped module whose activation MoELayer does not compute is an error that names
    it (it is never skipped silently); leave it out by naming the FFNs to take in ``paths``.
    """
    if paths is not None:
        specs = []
        for p in paths:
            if isinstance(p, FFNSpec):
                specs.append(p)
                continue
            spec = _classify(get_module(model, p), p)
            if isinstance(spec, str):
                raise RecipeError(
                    f"moefy: {spec}, which MoELayer does not compute; supported: {_SUPPORTED}."
                )
            if spec is None:
                kids = ", ".join(type(c).__name__ for c in get_module(model, p).children())
                raise RecipeError(
                    f"moefy: module '{p}' is not a recognised FFN (children: {kids or 'none'}); "
                    "expected a BERT-style layer, a gate/up/down_proj MLP or Linear -> "
                    "activation -> Linear. Describe it with FFNSpec(replace=, up=, down=, "
                    "activation=)."
                )
            specs.append(spec)
        return specs
    specs, unsupported, taken = [], [], []
    for name, m in model.named_modules():
        if "" in taken or any(name == t or name.startswith(t + ".") for t in taken):
            continue
        spec = _classify(m, name)
        if spec is not None:
            (unsupported if isinstance(spec, str) else specs).append(spec)
            taken.append(name)
    if unsupported:
        shown = "; ".join(unsupported[:3]) + (
            f"; ... ({len(unsupported)} in all)" if len(unsupported) > 3 else ""
        )
        raise RecipeError(
            f"moefy: {shown}: MoELayer does not compute that activation (supported: "
            f"{_SUPPORTED}). Name the FFNs to MoEfy with ffns=[...] to leave these out."
        )
    if not specs:
        raise RecipeError(
            f"moefy: found no FFN in {type(model).__name__}; recognised are BERT-style layers, "
            "Llama-style gate/up/down_proj MLPs and Linear -> activation -> Linear modules. "
            "Name yours with ffns=[FFNSpec(...)]."
        )
    return specs


# -- weights of one FFN ---------------------------------------------------------------------
@dataclass
class FFNWeights:
    up: torch.Tensor  # (d_ff, d_model)
    b_in: torch.Tensor  # (d_ff,)
    gate: torch.Tensor | None  # (d_ff, d_model)
    down: torch.Tensor  # (d_model, d_ff)
    b_out: torch.Tensor | None  # (d_model,)
    activation: str

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d_model) -> (n, d_ff) hidden activations, float32."""
        if self.gate is not None:
            return F.silu(x @ self.gate.t()) * (x @ self.up.t())
        return _ACT[self.activation](x @ self.up.t() + self.b_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.hidden(x) @ self.down.t()  # (n, d_model)
        return y + self.b_out if self.b_out is not None else y


def _linears(model: nn.Module, spec: FFNSpec) -> tuple[nn.Linear, nn.Linear | None, nn.Linear]:
    """(up, gate, down) of ``spec``, checked to form one FFN of a supported kind."""

    def linear(p: str) -> nn.Linear:
        m = get_module(model, p)
        if not isinstance(m, nn.Linear):
            raise RecipeError(f"moefy: '{p}' is a {type(m).__name__}, expected nn.Linear.")
        return m

    up, down = linear(spec.up), linear(spec.down)
    gate = linear(spec.gate) if spec.gate else None
    glu = spec.activation == "swiglu"
    if glu != (gate is not None):
        raise RecipeError(f"moefy: {spec.replace}: 'swiglu' goes with a gate and only with it.")
    if not glu and spec.activation not in _ACT:
        raise RecipeError(
            f"moefy: {spec.replace}: activation {spec.activation!r} is not one of "
            f"swiglu, {', '.join(_ACT)}."
        )
    if glu and (up.bias is not None or gate.bias is not None):
        raise RecipeError(f"moefy: {spec.replace}: gate/up biases are not supported.")
    if up.out_features != down.in_features or down.out_features != up.in_features:
        raise RecipeError(
            f"moefy: {spec.replace}: up {tuple(up.weight.shape)} and down "
            f"{tuple(down.weight.shape)} do not form a d_model -> d_ff -> d_model FFN."
        )
    return up, gate, down


def ffn_weights(model: nn.Module, spec: FFNSpec) -> FFNWeights:
    """One FFN's weights as float32 CPU tensors (a copy; the model is not touched)."""
    up, gate, down = _linears(model, spec)
    f32 = lambda t: t.detach().float().cpu()  # noqa: E731
    return FFNWeights(
        up=f32(up.weight),
        b_in=f32(up.bias) if up.bias is not None else torch.zeros(up.out_features),
        gate=f32(gate.weight) if gate is not None else None,
        down=f32(down.weight),
        b_out=f32(down.bias) if down.bias is not None else None,
        activation=spec.activation,
    )


# -- running a model ----------------------------------------------------------------------------
def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    for o in out:
        if isinstance(o, torch.Tensor):
            return o
    raise BrickworkError("moefy: the model's output holds no tensor to compare.")
