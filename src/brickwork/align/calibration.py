"""Running models on calibration batches: the pieces the data-aware align methods share.

Activation matching (:mod:`~brickwork.align.activation_matching`,
:mod:`~brickwork.align.hf_activation`), activation-based OT fusion
(:mod:`~brickwork.align.ot_fusion`), ZipIt (:mod:`~brickwork.align.zipit`) and REPAIR
(:mod:`~brickwork.align.repair`) all run models on batches without changing them, read
tensors where modules see them, and correlate activations. Nothing here modifies a model:
hooks are removed and train/eval flags restored, even when the forward pass fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from brickwork.stats.collect import call

_EPS = 1e-12
K = TypeVar("K", bound=Hashable)


def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list, else
    ``model(batch)``."""
    return call(model, tuple(batch) if isinstance(batch, list) else batch)


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode under ``torch.no_grad``; their train/eval flags
    are restored on exit."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def hooked(
    model: nn.Module, points: Mapping[Hashable, tuple[str, Literal["in", "out"]]]
) -> Iterator[dict[Hashable, torch.Tensor]]:
    """``{key: tensor}`` filled while the block runs: for each ``key: (module name, "in" |
    "out")`` the first input (forward pre-hook) or output (forward hook; the first element of
    a tuple output) the module sees. The hooks are removed on exit."""
    modules = dict(model.named_modules())
    seen: dict[Hashable, torch.Tensor] = {}

    def keep(key: Hashable, z: Any) -> None:
        seen.setdefault(key, z[0] if isinstance(z, tuple) else z)

    handles = []
    try:
        for key, (name, mode) in points.items():
            module = modules[name]
            if mode == "in":
                hook = module.register_forward_pre_hook(lambda _m, a, _k=key: keep(_k, a[0]))
            else:
                hook = module.register_forward_hook(lambda _m, _a, o, _k=key: keep(_k, o))
            handles.append(hook)
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def attention_mask(batch: Any) -> torch.Tensor | None:
    """The ``attention_mask`` tensor of a mapping batch, else None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask if isinstance(mask, torch.Tensor) else None


def real_tokens(z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``z`` ``(batch, tokens, features)`` without its padded tokens, as ``(real tokens,
    features)``, when ``mask`` is its ``(batch, tokens)`` attention mask; else ``z``."""
    if mask is not None and z.dim() == 3 and tuple(z.shape[:2]) == tuple(mask.shape):
        return z[mask.bool()]  # (real tokens, features)
    return z


def cross_moments(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    keys: Iterable[K],
    collect: Callable[[nn.Module, Any], Mapping[K, torch.Tensor]],
) -> dict[K, Moments]:
    """``{key: Moments}`` of A's and B's activations over ``data``, ``collect(model, batch)``
    reading ``{key: activations}`` of one batch (both models in eval mode, no grad)."""
    moments = {key: Moments() for key in keys}
    with evaluating(model_a, model_b):
        for batch in data:
            z_a, z_b = collect(model_a, batch), collect(model_b, batch)
            for key, m in moments.items():
                m.add(z_a[key], z_b[key])
    return moments


class Moments:
    """Running sums for the cross-correlation of two ``(examples, d)`` activation streams
    (float64; every dim but the last is read as examples)."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: list[torch.Tensor] = []  # Σa, Σb, Σa², Σb², aᵀb

    def add(self, z_a: torch.Tensor, z_b: torch.Tensor) -> None:
        z_a = z_a.detach().to(torch.float64).reshape(-1, z_a.shape[-1])  # (examples, units)
        z_b = z_b.detach().to(torch.float64).reshape(-1, z_b.shape[-1])
        parts = [z_a.sum(0), z_b.sum(0), (z_a * z_a).sum(0), (z_b * z_b).sum(0), z_a.T @ z_b]
        self.sums = parts if not self.sums else [s + p for s, p in zip(self.sums, parts)]
        self.n += z_a.shape[0]

    def correlation(self) -> torch.Tensor:
        """``(d_a, d_b)`` Pearson correlations (0 for a constant feature)."""
        s_a, s_b, q_a, q_b, ab = (s / self.n for s in self.sums)
        cov = ab - torch.outer(s_a, s_b)
        std_a = (q_a - s_a**2).clamp_min(0).sqrt()
        std_b = (q_b - s_b**2).clamp_min(0).sqrt()
        return cov / (torch.outer(std_a, std_b) + _EPS)
