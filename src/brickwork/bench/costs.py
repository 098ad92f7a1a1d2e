"""The two cost columns of every benchmark row: ``active_params`` and ``latency_ms``.

``active_params`` are the parameters one example passes through
(shared trunk + encoder, with an MoE's router and only ``top_k`` of its experts; plus the
head of its task, averaged over tasks since heads differ in size). ``latency_ms`` is the
encoder forward time per example on one batch of 64 test inputs (an equal share per task;
the minimum over repeats after a warm-up): a row that runs one encoder runs it on the whole
batch, a row with one encoder per task (``individual``, MoEfied fine-tunes) runs each on
its task's share, and an ensemble runs every member on the whole batch (the times add up).
For the text suite the encoder is the trained top (layers 3-5): the frozen trunk is the
same for every row and computed once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .suites import Suite, Task
from .train import Trainer


def moe_layers(model: nn.Module) -> list[Any]:
    from ..route.moe import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def set_top_k(model: nn.Module, k: int) -> nn.Module:
    """Route every MoE layer of ``model`` (in place) to ``k`` experts; returns it."""
    for m in moe_layers(model):
        m.top_k = k
    return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(active, total)`` parameters of ``model``: an MoE layer counts its router, its
    shared parts and ``top_k`` (all) of its experts; the zero padding of a
    :class:`~brickwork.bench.moe_rows.SquareMLP` is not
    counted."""
    layers = moe_layers(model)
    inside = {id(p) for m in layers for p in m.parameters()}
    active = total = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    pad = getattr(model, "pad_rows", 0)
    if pad and isinstance(getattr(model, "ffn", None), nn.Sequential):  # a dense SquareMLP
        active = total = active - pad * (model.ffn[-1].in_features + 1)
    for m in layers:
        d_out = m.d_model - pad
        expert = m.gate_up[0].numel() + d_out * m.d_ff
        expert += (m.d_ff if m.b_in is not None else 0) + (d_out if m.b_out is not None else 0)
        fixed = sum(p.numel() for p in m.router.parameters()) + (d_out if m.bias is not None else 0)
        fixed += sum(p.numel() for p in m.shared.parameters()) if m.shared is not None else 0
        active += fixed + m.top_k * expert
        total += fixed + m.n_experts * expert
    return active, total


def sample(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``range(n)`` (all when ``k >= n``), seeded, sorted."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[: min(k, n)].tolist())


class Costs:
    """``active_params`` and ``latency_ms`` of a row, measured the same way for every row."""

    def __init__(self, suite: Suite, trainer: Trainer, tasks: Sequence[Task], *, quick: bool):
        self.suite, self.trainer, self.tasks = suite, trainer, list(tasks)
        self.examples, self.repeats = (16, 1) if quick else (64, 3)
        self._enc: nn.Module | None = None
        self._inputs: dict[str, list[Any]] | None = None

    def sample(self) -> dict[str, list[Any]]:
        """The latency sample: ``latency_examples`` test inputs, an equal share per task."""
        if self._inputs is None:
            n, k = self.examples, len(self.tasks)
            self._inputs = {}
            for i, t in enumerate(self.tasks):
                prep = self.trainer.prepared(t, "test")
                idx = sample(len(prep), n // k + (i < n % k), self.suite.seed + i)
                self._inputs[t.name] = [prep[j] for j in idx]
        return self._inputs

    def _module(self, enc: nn.Module | Mapping[str, torch.Tensor]) -> nn.Module:
        if isinstance(enc, nn.Module):
            return enc.eval()
        if self._enc is None:
            self._enc = self.suite.new_encoder()
        self._enc.load_state_dict(dict(enc))
        return self._enc.eval()

    @torch.no_grad()
    def _seconds(self, model: nn.Module, batch: Any) -> float:
        model(batch)  # warm-up
        best = float("inf")
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            model(batch)
            best = min(best, time.perf_counter() - t0)
        return best

    def __call__(
        self,
        encoders: Mapping[str, Sequence[nn.Module | Mapping[str, torch.Tensor]]],
        heads: Mapping[str, nn.Linear],
    ) -> dict[str, Any]:
        """``encoders[task]``: what one example of ``task`` runs through (modules or encoder
        states); ``heads[task]``: its head. For the latency, every distinct encoder runs once
        on one batch: the sample's inputs of the tasks it serves."""
        active, shared = 0, self.suite.shared_params()
        served: dict[int, tuple[Any, list[Any]]] = {}
        for t in self.tasks:
            active += shared + sum(p.numel() for p in heads[t.name].parameters())
            for e in encoders[t.name]:
                active += count_params(self._module(e))[0]
                served.setdefault(id(e), (e, []))[1].extend(self.sample()[t.name])
        seconds = sum(
            self._seconds(self._module(e), self.suite.collate(xs)) for e, xs in served.values()
        )
        n = sum(len(xs) for xs in self.sample().values())
        return {
            "active_params": round(active / len(self.tasks)),
            "latency_ms": round(1000 * seconds / max(n, 1), 4),
        }

    def same(self, enc: Any, heads: Mapping[str, nn.Linear]) -> dict[str, Any]:
        """Costs of a row that serves every task with one encoder."""
        return self({t.name: [enc] for t in self.tasks}, heads)
