"""A mixture-of-experts feed-forward layer with vectorised sparse dispatch.

Tokens are flattened, their ``top_k`` (token, expert) slots sorted by expert, and each
expert runs one matmul on its contiguous group; results are weighted and scatter-added
back with ``index_add_``. The only Python loop is over experts, never over tokens.
``route_by="sequence"`` routes whole examples instead of tokens (see :class:`MoELayer`).
:meth:`MoELayer.forward_dense_reference` computes every expert on every token and masks:
the same numbers, for tests and as the naive baseline of ``benchmarks/moe_dispatch.py``.

:class:`MoEBlock` wraps a layer so that it returns a plain tensor, the drop-in replacement
for a dense FFN module inside a model (``brickwork.route.format`` saves and loads these).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError

Activation = Literal["swiglu", "gelu", "gelu_tanh", "relu", "silu"]
Routing = Literal["topk_softmax", "softmax_topk"]
Combine = Literal["weighted", "sum"]
OutBias = Literal["expert", "shared", "none"]
RouteBy = Literal["token", "sequence"]
ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh", "relu", "silu")
_ACT = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class MoEOutput(NamedTuple):
    output: torch.Tensor  # (..., d_model), the input's shape
    router_logits: torch.Tensor  # (tokens, n_experts), for load_balancing_loss; with
    # route_by="sequence" each token's row is its sequence's (mean) logits


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # (tokens, n_experts)
    weights: torch.Tensor  # (tokens, top_k)
    indices: torch.Tensor  # (tokens, top_k), int64


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RecipeError(msg)


class MoELayer(nn.Module):
    """Router (``d_model -> n_experts`` linear) + ``n_experts`` FFNs stored as stacked weights.

    ``activation="swiglu"`` (Llama/Mixtral): ``down(silu(gate(x)) * up(x))``, no biases;
    gate and up are stored fused as ``gate_up`` of shape ``(n_experts, 2 * d_ff, d_model)``
    (gate rows first), ``down`` as ``(n_experts, d_model, d_ff)``.
    ``activation="gelu"`` (BERT): ``w_out(gelu(w_in(x) + b_in)) + b_out``; likewise
    ``"gelu_tanh"``, ``"relu"`` and ``"silu"`` (one activation, no gate, with biases).

    ``routing="topk_softmax"`` (Mixtral): softmax over the ``top_k`` largest logits.
    ``routing="softmax_topk"``: softmax over all logits, then the ``top_k`` largest
    probabilities, divided by their sum if ``renormalize`` (then equal to ``topk_softmax``).
    ``shared_d_ff`` adds a shared expert of that width that every token passes through
    with weight 1 (DeepSeek-MoE style).

    ``combine="sum"`` (MoEfication): the ``top_k`` experts chosen by the largest logits are
    added with weight 1 each, so with ``top_k == n_experts`` the layer is the sum of all
    experts. ``out_bias`` says where the output bias lives: ``"expert"`` (one ``b_out`` per
    expert, weighted like its output; the default without a gate), ``"shared"`` (one
    ``bias`` of shape (d_model,) added once per token: a dense FFN split into experts) or
    ``"none"`` (the default for ``"swiglu"``, which has no biases at all). ``router_hidden``
    makes the router a small MLP ``Linear(d_model, h) -> ReLU -> Linear(h, n_experts)``.

    ``route_by="sequence"`` (task-level routing, Kudugunta et al. 2021, "Beyond
    Distillation: Task-level Mixture-of-Experts for Efficient Inference"): the router
    logits of all tokens of one example are averaged and every token of that example goes
    to the same ``top_k`` experts with the same weights. An input ``(..., tokens, d_model)``
    is a batch of sequences along dim -2; a 2-D input ``(n, d_model)`` is ``n`` examples of
    one token each (then sequence routing is token routing). Padding is left out of the
    average by a ``(..., tokens)`` mask of 1 (real) / 0 (pad): ``forward(x, mask=...)``, or,
    for a layer deep inside a model that calls its FFN with hidden states only, the
    attribute ``sequence_mask`` (set it with :func:`sequence_mask`). Without a mask every
    position counts, padding included. The default ``"token"`` routes each token alone.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        *,
        top_k: int = 2,
        activation: Activation = "swiglu",
        routing: Routing = "topk_softmax",
        renormalize: bool = True,
        shared_d_ff: int | None = None,
        router_bias: bool = False,
        router_hidden: int | None = None,
        combine: Combine = "weighted",
        out_bias: OutBias | None = None,
        route_by: RouteBy = "token",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check(
            min(d_model, d_ff, n_experts) > 0,
            f"MoELayer: d_model, d_ff and n_experts must be positive, got "
            f"{d_model}, {d_ff}, {n_experts}.",
        )
        _check(
            1 <= top_k <= n_experts,
            f"MoELayer: top_k must be in [1, n_experts={n_experts}], got {top_k}.",
        )
        _check(
            activation in ACTIVATIONS,
            f"MoELayer: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}.",
        )
        _check(
            combine in ("weighted", "sum"),
            f"MoELayer: combine must be 'weighted' or 'sum', got {combine!r}.",
        )
        glu = activation == "swiglu"
        out_bias = out_bias or ("none" if glu else "expert")
        _check(
            out_bias in (("none", "shared") if glu else ("expert", "shared", "none")),
            f"MoELayer: out_bias must be 'expert', 'shared' or 'none' ('none' or 'shared' for "
            f"swiglu, which has no per-expert biases), got {out_bias!r}.",
        )
        _check(
            router_hidden is None or router_hidden > 0,
            f"MoELayer: router_hidden must be positive, got {router_hidden}.",
        )
        _check(
            routing in ("topk_softmax", "softmax_topk"),
            f"MoELayer: routing must be 'topk_softmax' or 'softmax_topk', got {routing!r}.",
        )
        _check(
            route_by in ("token", "sequence"),
            f"MoELayer: route_by must be 'token' or 'sequence', got {route_by!r}.",
        )
        kw = {"device": device, "dtype": dtype}
        self.d_model, self.d_ff, self.n_experts, self.top_k = d_model, d_ff, n_experts, top_k
        self.activation, self.routing, self.renormalize = activation, routing, renormalize
        self.combine, self.out_bias, self.router_bias = combine, out_bias, router_bias
        self.router_hidden, self.shared_d_ff = router_hidden, shared_d_ff
        self.route_by = route_by
        self.sequence_mask: torch.Tensor | None = None  # (..., tokens); see sequence_mask()
        if router_hidden is None:
            self.router: nn.Module = nn.Linear(d_model, n_experts, bias=router_bias, **kw)
        else:
            self.router = nn.Sequential(
                nn.Linear(d_model, router_hidden, **kw),
                nn.ReLU(),
                nn.Linear(router_hidden, n_experts, bias=router_bias, **kw),
            )
        if glu:
            self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * d_ff, d_model, **kw))
            self.register_parameter("b_in", None)
        else:
            self.gate_up = nn.Parameter(torch.empty(n_experts, d_ff, d_model, **kw))
            self.b_in = nn.Parameter(torch.empty(n_experts, d_ff, **kw))
        if out_bias == "expert":
            self.b_out = nn.Parameter(torch.empty(n_experts, d_model, **kw))
        else:
            self.register_parameter("b_out", None)
        if out_bias == "shared":
            self.bias = nn.Parameter(torch.empty(d_model, **kw))
        else:
            self.register_parameter("bias", None)
        self.down = nn.Parameter(torch.empty(n_experts, d_model, d_ff, **kw))
        self.shared: FFN | None = (
            FFN(d_model, shared_d_ff, activation=activation, **kw) if shared_d_ff else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p, fan_in in ((self.gate_up, self.d_model), (self.down, self.d_ff)):
            nn.init.uniform_(p, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        for b in (self.b_in, self.b_out, self.bias):
            if b is not None:
                nn.init.zeros_(b)

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments (JSON-serialisable): ``MoELayer(**layer.config())``
        builds a layer of the same shape."""
        return {
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "activation": self.activation,
            "routing": self.routing,
            "renormalize": self.renormalize,
            "shared_d_ff": self.shared_d_ff,
            "router_bias": self.router_bias,
            "router_hidden": self.router_hidden,
            "combine": self.combine,
            "out_bias": self.out_bias,
            "route_by": self.route_by,
        }

    # -- routing ----------------------------------------------------------------------------
    def route(self, x: torch.Tensor, *, mask: torch.Tensor | None = None) -> RouterOutput:
        """``x`` (..., d_model) -> logits, top-k weights and expert indices, one row per token
        of ``x`` flattened. ``route_by="sequence"``: one choice per sequence (dim -2 of a
        3-D or larger ``x``), its logits the mean over the sequence's tokens where ``mask``
        (``x.shape[:-1]``, 1 = real token; default: ``self.sequence_mask``) is 1."""
        flat = x.reshape(-1, self.d_model)  # (tokens, d_model)
        logits = self.router(flat)  # (tokens, n_experts)
        if self.route_by == "token" or x.dim() < 3:
            return self._pick(logits, x.dtype)
        n_seq, n_tok = flat.shape[0] // x.shape[-2], x.shape[-2]
        per = logits.reshape(n_seq, n_tok, self.n_experts)  # (sequences, tokens, n_experts)
        mask = self.sequence_mask if mask is None else mask
        if mask is None:
            seq = per.mean(dim=1)  # (sequences, n_experts)
        else:
            _check(
                tuple(mask.shape) == tuple(x.shape[:-1]),
                f"MoELayer: the sequence mask must have the input's shape without d_model, "
                f"{tuple(x.shape[:-1])}, got {tuple(mask.shape)}; set it for this batch.",
            )
            w = mask.reshape(n_seq, n_tok, 1).to(per.dtype)  # (sequences, tokens, 1)
            seq = (per * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)  # (sequences, n_experts)
        r = self._pick(seq, x.dtype)  # one row per sequence

        def each_token(t: torch.Tensor) -> torch.Tensor:  # (sequences, c) -> (tokens, c)
            return t.unsqueeze(1).expand(n_seq, n_tok, t.shape[-1]).reshape(-1, t.shape[-1])

        return RouterOutput(*(each_token(t) for t in r))

    def _pick(self, logits: torch.Tensor, dtype: torch.dtype) -> RouterOutput:
        """Router ``logits`` (rows, n_experts) -> top-k weights and indices per row."""
        if self.combine == "sum":
            idx = logits.topk(self.top_k, dim=-1).indices  # (rows, top_k)
            ones = torch.ones(idx.shape, dtype=dtype, device=logits.device)
            return RouterOutput(logits, ones, idx)
        if self.routing == "topk_softmax":
            top, idx = logits.topk(self.top_k, dim=-1)  # (rows, top_k)
            weights = top.float().softmax(dim=-1)
        else:
            probs = logits.float().softmax(dim=-1)
            weights, idx = probs.topk(self.top_k, dim=-1)
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, weights.to(dtype), idx)

    # -- experts ----------------------------------------------------------------------------
    def expert(self, e: int, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Expert ``e`` on ``x`` (n, d_model) -> (n, d_model), into ``out`` if given (no grad)."""
        if self.activation == "swiglu":
            gate, up = F.linear(x, self.gate_up[e]).chunk(2, dim=-1)  # (n, d_ff) each
            h = F.silu(gate) * up
            if out is None:
                return F.linear(h, self.down[e])
            return torch.mm(h, self.down[e].t(), out=out)
        h = _ACT[self.activation](F.linear(x, self.gate_up[e], self.b_in[e]))  # (n, d_ff)
        b = self.b_out[e] if self.b_out is not None else None
        if out is None:
            return F.linear(h, self.down[e], b)
        if b is None:
            return torch.mm(h, self.down[e].t(), out=out)
        return torch.addmm(b, h, self.down[e].t(), out=out)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None) -> MoEOutput:
        """``x`` (..., d_model); ``mask`` (``x.shape[:-1]``) only matters for
        ``route_by="sequence"`` (see :meth:`route`)."""
        shape = x.shape
        flat = x.reshape(-1, self.d_model)  # (tokens, d_model)
        r = self.route(x, mask=mask)
        out = self._dispatch(flat, r.weights, r.indices)
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.bias is not None:
            out = out + self.bias
        return MoEOutput(out.reshape(shape), r.logits)

    def _dispatch(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        k = self.top_k
        flat_e = indices.reshape(-1)  # (tokens * top_k,) expert of each slot
        order = flat_e.argsort(stable=True)  # slots grouped by expert
        token = order // k  # (tokens * top_k,) token of each sorted slot
        counts = torch.bincount(flat_e, minlength=self.n_experts).tolist()
        xs = x.index_select(0, token)  # (tokens * top_k, d_model), grouped by expert
        w = weights.reshape(-1, 1)[order]  # (tokens * top_k, 1)
        groups = zip(range(self.n_experts), xs.split(counts))
        weighted = self.combine == "weighted"
        if torch.is_grad_enabled():
            ys = torch.cat([self.expert(e, g) for e, g in groups if len(g)])
            ys = ys * w if weighted else ys
        else:  # inference: experts write straight into one buffer, no copies
            ys = torch.empty_like(xs)
            for (e, g), o in zip(groups, ys.split(counts)):
                if len(g):
                    self.expert(e, g, out=o)
            if weighted:
                ys.mul_(w)
        return torch.zeros_like(x).index_add_(0, token, ys)  # (tokens, d_model)

    def forward_dense_reference(
        self, x: torch.Tensor, *, mask: torch.Tensor | None = None
    ) -> MoEOutput:
        """Every expert on every token, then mask by the routing weights (slow; same numbers)."""
        shape = x.shape
        flat = x.reshape(-1, self.d_model)  # (tokens, d_model)
        r = self.route(x, mask=mask)
        gates = torch.zeros(
            flat.shape[0], self.n_experts, dtype=flat.dtype, device=flat.device
        ).scatter(1, r.indices, r.weights)  # (tokens, n_experts), zero off the top-k
        out = torch.zeros_like(flat)
        for e in range(self.n_experts):
            out = out + gates[:, e : e + 1] * self.expert(e, flat)
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.bias is not None:
            out = out + self.bias
        return MoEOutput(out.reshape(shape), r.logits)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, n_experts={self.n_experts}, "
            f"top_k={self.top_k}, activation={self.activation}, routing={self.routing}"
            + (f", combine={self.combine}" if self.combine != "weighted" else "")
            + (f", out_bias={self.out_bias}" if self.out_bias == "shared" else "")
            + (f", route_by={self.route_by}" if self.route_by != "token" else "")
        )


class MoEBlock(nn.Module):
    """A :class:`MoELayer` that returns a plain tensor: the drop-in replacement of a dense FFN
    module inside a model. ``forward(x, *args, **kwargs)`` ignores the extra arguments (the
    ones some model code passes to its FFN) and returns ``moe(x).output``."""

    def __init__(self, moe: MoELayer) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.moe(x).output


@contextmanager
def sequence_mask(model: nn.Module, mask: torch.Tensor | None) -> Iterator[nn.Module]:
    """Within the ``with`` block, every :class:`MoELayer` of ``model`` with
    ``route_by="sequence"`` averages its router logits over the tokens where ``mask``
    (batch, tokens) is 1 (padding left out); afterwards no mask is set. For models whose
    FFN modules receive hidden states only (as a :class:`MoEBlock` inside a transformer):
    ``with sequence_mask(model, attention_mask): model(ids, attention_mask)``."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for m in layers:
        m.sequence_mask = mask
    try:
        yield model
    finally:
        for m in layers:
            m.sequence_mask = None


class FFN(nn.Module):
    """One dense FFN in the same layout as one MoE expert (used as the shared expert)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: Activation = "swiglu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.activation = activation
        glu = activation == "swiglu"
        self.w_in = nn.Linear(d_model, (2 if glu else 1) * d_ff, bias=not glu, **kw)
        self.w_out = nn.Linear(d_ff, d_model, bias=not glu, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate, up = self.w_in(x).chunk(2, dim=-1)
            return self.w_out(F.silu(gate) * up)
        return self.w_out(_ACT[self.activation](self.w_in(x)))


def load_balancing_loss(
    router_logits: torch.Tensor | Sequence[torch.Tensor],
    top_k: int,
    *,
    coef: float = 1.0,
) -> torch.Tensor:
    """Switch-Transformer / Mixtral auxiliary loss ``coef * E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the (token, slot) assignments that go to expert ``e`` (it
    sums to 1 over experts) and ``P_e`` the mean router probability of ``e``. Perfectly
    uniform routing gives ``coef``; everything on one expert gives ``coef * E``. Equal to
    ``transformers``' ``load_balancing_loss_func`` divided by ``top_k``. A sequence of
    per-layer logits (each (tokens, n_experts)) is concatenated, as transformers does.
    """
    if not isinstance(router_logits, torch.Tensor):
        router_logits = torch.cat([t.reshape(-1, t.shape[-1]) for t in router_logits], dim=0)
    logits = router_logits.reshape(-1, router_logits.shape[-1]).float()  # (tokens, n_experts)
    n_experts = logits.shape[-1]
    if not 1 <= top_k <= n_experts:
        raise RecipeError(f"load_balancing_loss: top_k must be in [1, {n_experts}], got {top_k}.")
    probs = logits.softmax(dim=-1)
    idx = probs.topk(top_k, dim=-1).indices  # (tokens, top_k)
    f = torch.bincount(idx.reshape(-1), minlength=n_experts).float() / idx.numel()
    return coef * n_experts * (f * probs.mean(dim=0)).sum()
