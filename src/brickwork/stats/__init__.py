"""Statistics of models on calibration data, computed once and shared by merge, align and
compress (DESIGN.md "Statistics"): :func:`statistics_for` measures (or reads from the cache)
the Gram matrices or diagonal Fisher of one module on one set of batches.

Kinds: ``gram`` (``XᵀX`` of every linear layer's inputs, padding masked, with row counts)
and ``fisher`` (per-example diagonal Fisher of every parameter; see
:mod:`brickwork.stats.collect` for the estimates). Cached as safetensors under
``$BRICKWORK_CACHE/statistics/`` keyed by (model hash, data hash, kind).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .store import (
    StatisticsFile,
    StatisticsSource,
    TensorStatistics,
    cache_path,
    cache_root,
    data_hash,
    module_hash,
    read_info,
    save_atomic,
)

__all__ = [
    "StatisticsFile",
    "StatisticsSource",
    "TensorStatistics",
    "cache_root",
    "statistics_for",
]


def _examples(batches: list[Any]) -> int:
    n = 0
    for b in batches:
        first = (
            next(v for v in b.values() if isinstance(v, torch.Tensor))
            if isinstance(b, dict)
            else (b[0] if isinstance(b, tuple) else b)
        )
        n += int(first.shape[0])
    return n


def statistics_for(
    model: nn.Module,
    batches: Iterable[Any],
    kind: str,
    *,
    model_hash: str | None = None,
    fisher_estimate: str = "sampled",
    seed: int = 0,
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    where: str = "model",
) -> StatisticsFile:
    """Statistics ``kind`` ("gram" or "fisher") of ``model`` on ``batches``, from the cache
    when the same model (``model_hash``, else a hash of its state dict) has seen the same
    data with the same options, else computed and cached (atomically)."""
    from .collect import collect_fisher, collect_gram

    batches = list(batches)
    options = _options(kind, fisher_estimate, seed, logits_fn)
    mh = model_hash or module_hash(model)
    dh = data_hash(batches, options)
    path = cache_path(mh, dh, kind)
    info = read_info(path)
    if info is not None:
        return StatisticsFile(path, kind, info, hit=True)
    info = {"model_hash": mh, "data_hash": dh, "options": options}
    if kind == "gram":
        grams = collect_gram(model, batches, where=where)
        info["tensors"] = {
            n: {"rows": g.rows, "input_axis": g.input_axis} for n, g in grams.items()
        }
        info["rows"] = max((g.rows for g in grams.values()), default=0)
        info["examples"] = _examples(batches)
        tensors = _float32_releasing(grams)
    elif kind == "fisher":
        f = collect_fisher(
            model, batches, estimate=fisher_estimate, seed=seed, logits_fn=logits_fn, where=where
        )  # type: ignore[arg-type]
        tensors = {n: v.contiguous() for n, v in f.values.items()}
        tensors = _untie(tensors)
        info |= {"norm": f.norm, "examples": f.examples}
    else:
        raise ValueError(f"statistics kind {kind!r}; known: gram, fisher")
    save_atomic(path, tensors, info)
    return StatisticsFile(path, kind, info)


def _options(
    kind: str, fisher_estimate: str, seed: int, logits_fn: Callable[[Any], torch.Tensor] | None
) -> dict[str, Any]:
    """The collection options that key the cache (with the model and data hashes)."""
    options: dict[str, Any] = {"kind": kind}
    if kind == "fisher":
        options |= {"estimate": fisher_estimate, "seed": seed}
        if logits_fn is not None:
            options["logits_fn"] = getattr(logits_fn, "__qualname__", repr(logits_fn))
    return options


def cached_statistics(
    batches: Iterable[Any],
    kind: str,
    *,
    model_hash: str,
    fisher_estimate: str = "sampled",
    seed: int = 0,
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
) -> StatisticsFile | None:
    """The cached file :func:`statistics_for` would return for a model whose hash is
    ``model_hash``, or ``None`` when it is not cached; needs no model, so a caller can load
    one only on a miss."""
    options = _options(kind, fisher_estimate, seed, logits_fn)
    path = cache_path(model_hash, data_hash(list(batches), options), kind)
    info = read_info(path)
    return None if info is None else StatisticsFile(path, kind, info, hit=True)


def _float32_releasing(grams: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The float32 copies of the float64 accumulators, each accumulator dropped from
    ``grams`` (emptied) as soon as it is converted: memory holds the float64 matrices plus
    one float32 matrix, not both sets (for a 0.5B Llama 3.6 GB + 1.8 GB)."""
    out = {}
    for name in list(grams):
        out[name] = grams.pop(name).sum.to(torch.float32)  # (in, in)
    return out


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: tied parameters get their own copy."""
    seen: set[int] = set()
    out = {}
    for n, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[n] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out
