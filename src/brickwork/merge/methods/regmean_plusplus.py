"""RegMean++: RegMean whose Gram matrices of layer ``l`` are collected on the inputs that the
*merged* model's layers ``< l`` produce, so that collection and merging interleave layer by
layer (Nguyen et al. 2025, RegMean++: Enhancing Effectiveness and Generalization of
Regression Mean for Model Merging, arXiv:2508.03121).

Plain RegMean measures every model's Gram matrices on its own forward pass; in the merged
model, layer ``l`` receives the merged layers' outputs instead, which drift from each
model's. RegMean++ follows the merged model:

1. the tensors before the first layer (embeddings) are averaged, as in the paper;
2. for each layer ``l`` in order, and for every model ``i``: the model made of the merged
   layers ``< l`` and model ``i``'s layer ``l`` runs on model ``i``'s calibration data, and
   the inputs of layer ``l``'s linear layers give ``G_i`` (intra-layer dependencies: inside
   the layer, model ``i``'s own sub-layers feed each other); layer ``l`` is then merged with
   RegMean's closed form (:mod:`.regmean`, same ``alpha``, ``gram``, ``check_rows`` and
   ridge rule) and
   its other tensors averaged;
3. the tensors after the last layer (final norm, pooler, heads) are merged the same way on
   the merged trunk's outputs.

Layers are found from tensor names (``brickwork.arch``: ``...layers.N.``, ``h.N``,
``layer.N``, ``blocks.N``), so any Hugging Face model or ``nn.Module`` with such names works.
It is module level (it needs the models and data, not only statistics). Intended
differences from FusionBench's ``RegMeanAlgorithmPlusPlus``: it is not specific to CLIP's
vision tower; each step re-runs the merged prefix on the data (forward cost ``O(L²)`` layer
passes for ``L`` layers instead of caching hidden states, which a generic module cannot
replay safely), and the tensors after the last layer are merged rather than taken from the
pretrained model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ...arch import layer_name
from ...errors import DataError, RegularizedWarning
from ...stats.collect import StopForward, _eval, collect_gram, linear_modules
from ...stats.store import TensorStatistics
from ..registry import module_merge_method
from .regmean import Alpha, mean_of, regmean_merge


def _stages(names: list[str]) -> list[tuple[str, list[str]]]:
    """State-dict names grouped into stages: "pre", each layer ("<prefix><index>"), "post"."""
    order: dict[str, list[str]] = {}
    seen_layer = False
    for n in names:
        ln = layer_name(n)
        if ln is None:
            key = "post" if seen_layer else "pre"
        else:
            seen_layer = True
            key = f"{ln.prefix}{ln.index}"
        order.setdefault(key, []).append(n)
    return list(order.items())


def _block(model: nn.Module, key: str) -> nn.Module | None:
    try:
        return model.get_submodule(key)
    except AttributeError:
        return None


def _stage_grams(
    work: nn.Module,
    batches: list[Any],
    weights: set[str],
    stop_at: nn.Module | None,
    stop_before: bool,
    where: str,
) -> dict[str, Any]:
    """Gram matrices of the linear layers named in ``weights`` on one forward pass of
    ``work`` per batch, ended by a hook on ``stop_at`` (after it runs; before it with
    ``stop_before``)."""

    def stop(*_: Any) -> None:
        raise StopForward

    handle = None
    if stop_at is not None:
        handle = (
            stop_at.register_forward_pre_hook(stop)
            if stop_before
            else stop_at.register_forward_hook(stop)
        )
    try:
        return collect_gram(work, batches, where=where, only=weights)
    finally:
        if handle is not None:
            handle.remove()


@module_merge_method(
    "regmean_plusplus",
    base="optional",
    reference="Nguyen et al. 2025, RegMean++: Enhancing Effectiveness and Generalization of "
    "Regression Mean for Model Merging, arXiv:2508.03121",
    statistics=("gram",),
)
def regmean_plusplus(
    base: nn.Module | None,
    models: Sequence[nn.Module],
    data: Sequence[Iterable[Any]],
    *,
    alpha: Alpha = 0.9,
    gram: Literal["mean", "sum"] = "mean",
    check_rows: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """RegMean++: layer by layer, RegMean on Gram matrices collected from the inputs that
    the merged model's previous layers produce (module level: models and data)."""
    models = list(models)
    data = [list(d) for d in data]
    if len(data) != len(models):
        raise DataError(
            f"regmean_plusplus: {len(models)} models but {len(data)} data sets; give one "
            "iterable of calibration batches per model."
        )
    ref = base if base is not None else models[0]
    merged = copy.deepcopy(ref).eval()
    work = copy.deepcopy(ref)
    states = [m.state_dict() for m in models]
    names = list(merged.state_dict())
    linear = set(linear_modules(merged))
    info: dict[str, Any] = {"stages": 0, "regularized": [], "rows": {}}
    layer_keys = [k for k, _ in _stages(names) if k not in ("pre", "post")]
    first_block = _block(work, layer_keys[0]) if layer_keys else None
    with torch.no_grad(), _eval(work):
        for key, stage in _stages(names):
            floats = [n for n in stage if merged.state_dict()[n].is_floating_point()]
            weights = {n for n in floats if n in linear}
            stats: dict[str, list[TensorStatistics]] = {n: [] for n in weights}
            if weights:
                stop_at, before = (
                    (first_block, True) if key == "pre" else (_block(work, key), False)
                )
                for i, (st, batches) in enumerate(zip(states, data)):
                    _load(work, {n: st[n] for n in floats})
                    grams = _stage_grams(
                        work, batches, weights, None if key == "post" else stop_at, before,
                        f"model {i}",
                    )  # fmt: skip
                    for n in weights:
                        g = grams[n]
                        stats[n].append(
                            TensorStatistics(
                                gram=g.sum, rows=g.rows, input_axis=g.input_axis, model=f"model {i}"
                            )
                        )
            out = {}
            for n in floats:
                tensors = [st[n].to(torch.float32) for st in states]
                if n in weights:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", RegularizedWarning)
                        try:
                            out[n] = regmean_merge(
                                tensors, stats[n], alpha=alpha, gram=gram, check=check_rows
                            )
                        except DataError as e:
                            raise DataError(f"tensor '{n}': {e}") from None
                    info["regularized"] += [{"tensor": n, "note": str(w.message)} for w in caught]
                    info["rows"][n] = [s.rows for s in stats[n]]
                else:
                    out[n] = mean_of(tensors)
            _load(merged, out)
            _load(work, out)
            info["stages"] += 1
    if info["regularized"]:
        first = info["regularized"][0]
        warnings.warn(
            RegularizedWarning(
                f"regmean_plusplus: {len(info['regularized'])} singular system(s) solved with "
                f"a small ridge (first: tensor '{first['tensor']}': {first['note']})"
            ),
            stacklevel=2,
        )
    return merged, info


def _load(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``model``'s parameters and buffers of the same names."""
    sd = model.state_dict()
    for n, t in tensors.items():
        sd[n].copy_(t.to(sd[n].dtype))
