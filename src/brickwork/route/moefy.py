"""MoEfication: split each dense FFN of a model into experts and train a router per layer.

Zhang, Lin, Liu, Li, Sun & Zhou, "MoEfication: Transformer Feed-forward Layers are Mixtures
of Experts", Findings of ACL 2022 (arXiv:2110.01786).

An FFN ``down(act(up(x) + b_in)) + b_out`` with ``d_ff`` hidden neurons is a sum over its
neurons, so splitting the neurons into ``K`` groups gives ``K`` experts whose *unweighted
sum* (plus ``b_out`` once) is exactly the FFN. Routing each token to its ``top_k`` experts
then skips the neurons that would contribute little. Steps, per FFN:

1. Expert construction: the ``d_ff`` neurons are split into ``K`` equal groups by balanced
   k-means on the neurons' weight vectors (rows of ``W_in``, concatenated with the gate's
   rows for SwiGLU) -- the paper's *parameter clustering split* -- or, with
   ``clustering="coactivation"``, on the rows of the neurons' co-activation matrix
   ``|H|^T |H|`` over calibration tokens (unit-normalised). The paper partitions that
   co-activation graph with METIS; balanced k-means on its rows is this module's
   dependency-free stand-in with the same aim (neurons that fire together share an expert).
2. Expert selection: a router (``linear``, or a small ``mlp``) is trained with Adam to
   predict, from the FFN input, the share of the FFN's activation mass each expert holds:
   ``mass_e(x) = sum_{i in e} |h_i(x)| * ||W_out[:, i]||`` (an upper bound of the norm of
   expert ``e``'s contribution), by cross-entropy against ``mass / sum(mass)``.

At inference the ``top_k`` experts with the largest router logits run and their outputs are
summed (``MoELayer(combine="sum", out_bias="shared")``); with ``top_k == K`` the MoE is the
dense model. Supported FFNs: Hugging Face BERT-style layers (``intermediate.dense`` ->
act -> ``output.dense``), Llama / Mistral / Qwen2 MLPs (``gate_proj``, ``up_proj``,
``down_proj``), ``Linear -> activation -> Linear`` modules (``nn.Sequential`` or any module
with those three children, dropout and identity aside), and any pair named by an
:class:`FFNSpec`. Every result is checked end to end: the MoEfied model with all experts
active must reproduce the dense model on a calibration batch, or nothing is returned.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BrickworkError, RecipeError
from .cluster import balanced_kmeans
from .ffn import (  # noqa: F401 (FFNSpec, find_ffns, _call: re-exported for callers)
    FFNSpec,
    FFNWeights,
    _call,
    _first_tensor,
    _linears,
    ffn_weights,
    find_ffns,
)
from .format import get_module, replace_module
from .moe import MoEBlock, MoELayer

Clustering = Literal["kmeans", "coactivation"]
RouterKind = Literal["linear", "mlp"]


@dataclass(frozen=True)
class LayerReport:
    """How well one MoEfied FFN's router does on held-out calibration tokens."""

    path: str
    d_ff: int
    n_experts: int
    top_k: int
    tokens: int  # held-out tokens the numbers below are measured on
    router_recall: float  # share of the oracle's top-k experts the router picks
    kept_mass: float  # share of the activation mass in the router's top-k experts
    oracle_kept_mass: float  # ... in the best possible top-k
    random_kept_mass: float  # ... expected of a random router (top_k / n_experts)
    output_rel_error: float  # ||moe(x) - ffn(x)|| / ||ffn(x)|| at top_k


@dataclass
class MoEfied:
    model: nn.Module
    report: list[LayerReport]
    specs: list[FFNSpec]
    partitions: list[torch.Tensor]  # per FFN: (n_experts, d_ff / n_experts) neuron indices

    def summary(self) -> dict[str, float]:
        keys = ("router_recall", "kept_mass", "oracle_kept_mass", "output_rel_error")
        return {k: sum(getattr(r, k) for r in self.report) / len(self.report) for k in keys}


# -- calibration ----------------------------------------------------------------------------
def _batches(calibration: Any) -> list[Any]:
    if calibration is None:
        raise RecipeError("moefy: calibration inputs are required (router training needs them).")
    batches = [calibration] if isinstance(calibration, torch.Tensor | dict) else list(calibration)
    if not batches:
        raise RecipeError("moefy: calibration is empty; give at least one batch.")
    return batches


@torch.no_grad()
def collect_inputs(
    model: nn.Module,
    paths: Sequence[str],
    batches: Iterable[Any],
    *,
    max_tokens: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Run ``batches`` through ``model`` and return each module's input tokens (n, d), float32.

    Padding positions (``attention_mask == 0`` in a dict batch) are dropped. With
    ``max_tokens``, each module keeps a uniform random sample of at most that many tokens
    (every token gets a seeded random key; the largest keys are kept), so memory stays
    bounded however much calibration data there is. The model's train/eval flags are
    restored afterwards.
    """
    got: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    keys: dict[str, torch.Tensor] = {p: torch.empty(0) for p in paths}
    gens = {p: torch.Generator().manual_seed(seed * 1_000_003 + i) for i, p in enumerate(paths)}
    mask: list[torch.Tensor | None] = [None]

    def hook(path: str):
        def fn(_m, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            m = mask[0]
            if m is not None and tuple(m.shape) == tuple(x.shape[:-1]):
                x = x[m.bool()]
            x = x.detach().reshape(-1, x.shape[-1]).float().cpu()  # (n, d)
            if max_tokens is None:
                got[path].append(x)
                return
            k = torch.cat([keys[path], torch.rand(x.shape[0], generator=gens[path])])
            xs = torch.cat([*got[path], x])
            if len(k) > max_tokens:
                top = k.topk(max_tokens).indices
                k, xs = k[top], xs[top]
            keys[path], got[path] = k, [xs]

        return fn

    flags = {m: m.training for m in model.modules()}
    handles = [
        get_module(model, p).register_forward_pre_hook(hook(p), with_kwargs=True) for p in paths
    ]
    try:
        model.eval()
        for b in batches:
            mask[0] = b.get("attention_mask") if isinstance(b, dict) else None
            _call(model, b)
    finally:
        for h in handles:
            h.remove()
        for m, t in flags.items():
            m.training = t
    return {p: torch.cat(v) for p, v in got.items()}


# -- one FFN --------------------------------------------------------------------------------
def split_neurons(
    w: FFNWeights,
    n_experts: int,
    *,
    clustering: Clustering = "kmeans",
    inputs: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """(n_experts, d_ff / n_experts) neuron indices of each expert, each row sorted."""
    if clustering == "kmeans":
        feats = w.up if w.gate is None else torch.cat([w.gate, w.up], dim=1)  # (d_ff, ·)
    elif clustering == "coactivation":
        if inputs is None:
            raise RecipeError("moefy: clustering 'coactivation' needs calibration inputs.")
        h = w.hidden(inputs).abs()  # (n, d_ff)
        feats = F.normalize(h.t() @ h, dim=1)  # (d_ff, d_ff) co-activation rows
    else:
        raise RecipeError(
            f"moefy: clustering must be 'kmeans' or 'coactivation', got {clustering!r}."
        )
    labels = balanced_kmeans(feats, n_experts, seed=seed)  # (d_ff,)
    return torch.stack([(labels == e).nonzero().squeeze(1) for e in range(n_experts)])


def expert_mass(w: FFNWeights, x: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """(n, n_experts): ``sum_{i in e} |h_i(x)| * ||W_out[:, i]||`` for each expert ``e``."""
    contrib = w.hidden(x).abs() * w.down.norm(dim=0)  # (n, d_ff)
    return contrib[:, parts].sum(-1)  # (n, n_experts, d_ff / n_experts) -> (n, n_experts)


def build_moe(
    w: FFNWeights, parts: torch.Tensor, *, top_k: int, router_hidden: int | None
) -> MoELayer:
    """The float32 MoELayer whose experts are ``parts``' neurons; router untrained."""
    n_experts, m = parts.shape
    d_model = w.up.shape[1]
    moe = MoELayer(
        d_model, m, n_experts, top_k=top_k,
        activation=w.activation, combine="sum", router_bias=True, router_hidden=router_hidden,
        out_bias="shared" if w.b_out is not None else "none",
    )  # fmt: skip
    with torch.no_grad():
        up = w.up[parts]  # (n_experts, m, d_model)
        moe.gate_up.copy_(up if w.gate is None else torch.cat([w.gate[parts], up], dim=1))
        moe.down.copy_(w.down[:, parts].permute(1, 0, 2))  # (n_experts, d_model, m)
        if moe.b_in is not None:
            moe.b_in.copy_(w.b_in[parts])  # (n_experts, m)
        if moe.bias is not None:
            moe.bias.copy_(w.b_out)
    return moe


def train_router(
    router: nn.Module,
    x: torch.Tensor,
    mass: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 1024,
    seed: int = 0,
    on_step: Any = None,
) -> None:
    """Fit ``router`` (in place) so softmax(router(x)) matches ``mass / mass.sum(-1)``."""
    target = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)  # (n, n_experts)
    scale = x.std().clamp_min(1e-6)  # inputs of any scale train at the same learning rate
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    flops = min(batch_size, n) * sum(p.numel() for p in router.parameters())
    threads = torch.get_num_threads()
    if flops < 5e7:  # tiny matmuls: extra threads only spin-wait (27 s vs 1.3 s, loaded 2 cores)
        torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(n, (min(batch_size, n),), generator=g)
                logits = router(x[idx] / scale)
                loss = -(target[idx] * logits.log_softmax(-1)).sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if on_step is not None:
                    on_step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():  # fold the input scale into the first layer
        first = router if isinstance(router, nn.Linear) else router[0]
        first.weight.div_(scale)


@torch.no_grad()
def evaluate(
    moe: MoELayer, w: FFNWeights, x: torch.Tensor, mass: torch.Tensor, path: str
) -> LayerReport:
    k, n_experts = moe.top_k, moe.n_experts
    picked = moe.router(x).topk(k, dim=-1).indices  # (n, k)
    best = mass.topk(k, dim=-1).indices  # (n, k)
    total = mass.sum(-1).clamp_min(1e-12)
    hits = (picked[:, :, None] == best[:, None, :]).any(-1).float().sum(-1)  # (n,)
    ref = w(x)  # (n, d_model)
    err = (moe(x).output - ref).norm() / ref.norm().clamp_min(1e-12)
    return LayerReport(
        path=path, d_ff=moe.d_ff * n_experts, n_experts=n_experts, top_k=k, tokens=x.shape[0],
        router_recall=float((hits / k).mean()),
        kept_mass=float((mass.gather(1, picked).sum(-1) / total).mean()),
        oracle_kept_mass=float((mass.gather(1, best).sum(-1) / total).mean()),
        random_kept_mass=k / n_experts, output_rel_error=float(err),
    )  # fmt: skip


# -- the model ------------------------------------------------------------------------------
def moefy(
    model: nn.Module,
    *,
    n_experts: int,
    top_k: int,
    calibration: Any,
    ffns: Sequence[str | FFNSpec] | None = None,
    clustering: Clustering = "kmeans",
    router: RouterKind = "linear",
    router_hidden: int | None = None,
    steps: int = 300,
    lr: float | None = None,
    max_tokens: int = 8192,
    holdout: float = 0.2,
    seed: int = 0,
    check: bool = True,
    progress: bool = False,
) -> MoEfied:
    """Return a copy of ``model`` whose FFNs are MoEfied (``model`` is not changed).

    ``calibration``: a tensor (one batch), or an iterable of batches; each batch is what
    the model takes: a tensor (``model(t)``), a tuple (``model(*t)``) or a dict of keyword
    arguments (``model(**d)``, e.g. a tokenizer's output; padding is skipped). ``ffns``:
    module paths or :class:`FFNSpec` s (default: every recognised FFN). ``router``:
    ``"linear"`` or ``"mlp"`` (hidden width ``router_hidden``, default ``d_model``).
    Routers train for ``steps`` Adam steps (``lr`` default 1e-2 linear, 3e-3 mlp) on at
    most ``max_tokens`` tokens per FFN, ``holdout`` of them kept back for the report.
    ``check``: verify that the copy with every expert active reproduces ``model`` on the
    first calibration batch.
    """
    if not 1 <= top_k <= n_experts:
        raise RecipeError(f"moefy: top_k must be in [1, n_experts={n_experts}], got {top_k}.")
    if router not in ("linear", "mlp"):
        raise RecipeError(f"moefy: router must be 'linear' or 'mlp', got {router!r}.")
    if not 0 <= holdout < 1:
        raise RecipeError(f"moefy: holdout must be in [0, 1), got {holdout}.")
    specs = find_ffns(model, ffns)
    for s in specs:
        d_ff = _linears(model, s)[0].out_features
        if d_ff % n_experts:
            divisors = ", ".join(str(d) for d in range(1, d_ff + 1) if d_ff % d == 0)
            raise RecipeError(
                f"moefy: {s.replace}: d_ff={d_ff} is not divisible by n_experts={n_experts}; "
                f"choose one of {divisors}."
            )
    batches = _batches(calibration)
    paths = [s.replace for s in specs]
    inputs = collect_inputs(model, paths, batches, max_tokens=max_tokens, seed=seed)
    lr = lr if lr is not None else (1e-2 if router == "linear" else 3e-3)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * len(specs), desc="moefy: router training", unit="step")
    new = copy.deepcopy(model)
    report, partitions = [], []
    try:
        for i, s in enumerate(specs):
            w = ffn_weights(model, s)  # one FFN at a time: float32 copies of every FFN may not fit
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            x = inputs.pop(s.replace)
            x = x[torch.randperm(x.shape[0], generator=g)]  # (n, d_model), n <= max_tokens
            n_eval = math.floor(x.shape[0] * holdout)
            x_fit, x_eval = x[n_eval:], (x[:n_eval] if n_eval else x)
            parts = split_neurons(w, n_experts, clustering=clustering, inputs=x_fit, seed=seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + i)
                hidden = (router_hidden or w.up.shape[1]) if router == "mlp" else None
                moe = build_moe(w, parts, top_k=top_k, router_hidden=hidden)
            train_router(
                moe.router, x_fit, expert_mass(w, x_fit, parts), steps=steps, lr=lr,
                seed=seed + i, on_step=bar.update if bar is not None else None,
            )  # fmt: skip
            report.append(evaluate(moe, w, x_eval, expert_mass(w, x_eval, parts), s.replace))
            partitions.append(parts)
            ref = get_module(model, s.up).weight
            new = replace_module(new, s.replace, MoEBlock(moe.to(ref.device, ref.dtype)))
            for p in s.identity:
                new = replace_module(new, p, nn.Identity())
    finally:
        if bar is not None:
            bar.close()
    new.train(model.training)
    if check:
        _check_equivalence(model, new, batches[0], specs)
    return MoEfied(new, report, specs, partitions)


@torch.no_grad()
def _check_equivalence(model: nn.Module, new: nn.Module, batch: Any, specs: list[FFNSpec]) -> None:
    """With every expert active the MoEfied model must compute what the dense one does."""
    blocks = [m.moe for m in new.modules() if isinstance(m, MoEBlock)]
    ks = [b.top_k for b in blocks]
    flags = {m: m.training for m in (*model.modules(), *new.modules())}
    try:
        model.eval()
        new.eval()
        for b in blocks:
            b.top_k = b.n_experts
        ref = _first_tensor(_call(model, batch))
        got = _first_tensor(_call(new, batch))
    finally:
        for b, k in zip(blocks, ks):
            b.top_k = k
        for m, t in flags.items():
            m.training = t
    exact = ref.dtype in (torch.float32, torch.float64) and got.dtype == ref.dtype
    tol = 1e-4 if exact else 3e-2  # half precision: summing experts rounds differently
    ref, got = ref.float(), got.float()
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if got.shape != ref.shape or err > tol:
        raise BrickworkError(
            f"moefy: with all experts active the new model differs from the dense one "
            f"(max relative error {err:.2e} > {tol:g}); an FFN's forward is not "
            f"down(act(up(x))) as assumed for {[s.replace for s in specs][:4]}. Describe the "
            "FFNs with FFNSpec, or report this model type."
        )


def report_dict(result: MoEfied) -> dict[str, Any]:
    """The report as plain JSON-able data (per layer, and the mean over layers)."""
    return {"layers": [asdict(r) for r in result.report], "mean": result.summary()}
