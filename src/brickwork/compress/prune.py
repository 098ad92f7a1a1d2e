"""Unstructured and N:M pruning of the linear layers of a transformer: magnitude, Wanda and
SparseGPT (``brickwork compress prune``).

**Which weights.** Every ``nn.Linear`` / GPT-2 ``Conv1D`` weight inside the transformer
layers (tensor names with a layer index, ``...layers.N.`` / ``h.N.``): attention Q/K/V/O and
the FFN projections. Embeddings, the LM head and everything else outside the layers, biases
and norms are copied unchanged.

**Sparsity.** ``sparsity=s`` zeroes ``round(s · n)`` weights of each pruning unit: the whole
tensor (magnitude, ``scope="layer"``), all pruned tensors together (magnitude,
``scope="global"``), each output row (Wanda, as in the paper), each block of 128 input
columns (SparseGPT's adaptive mask, as in the paper). ``nm=(N, M)`` is NVIDIA's convention:
in every group of ``M`` consecutive *input* weights of an output row at most ``N`` are
non-zero (2:4 keeps 2 of every 4, 50 %); the input dimension must be divisible by ``M``.

**Methods.**

* ``magnitude``: keep the largest ``|W_ij|``. Tensor level: streamed one tensor at a time
  (``scope="layer"``); ``scope="global"`` first reads every pruned tensor's magnitudes once to
  find one threshold (memory: one float32 copy of all pruned weights).
* ``wanda`` (Sun et al. 2023, *A Simple and Effective Pruning Approach for Large Language
  Models*, arXiv:2306.11695): score ``S_ij = |W_ij| · ‖X_j‖₂`` where ``‖X_j‖₂² = (XᵀX)_jj`` over
  the calibration tokens; the lowest scores of each output row (or of each N:M group) are
  pruned; no weight update.
* ``sparsegpt`` (Frantar & Alistarh 2023, *SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot*, arXiv:2301.00774): with ``H = XᵀX + λI`` (``λ = 0.01 ·
  mean diag``; the paper's factor 2 cancels) and ``U`` the upper Cholesky factor of ``H⁻¹``,
  columns are processed left to right in blocks of 128; at the start of each block the
  mask of the block is chosen by the OBS saliency ``w² / U_jj²`` (for N:M at the start of
  each group of M); every pruned weight's error ``(w - 0) / U_jj`` is spread onto the
  not-yet-processed columns of its row through row ``j`` of ``U`` (lazy batched updates
  between blocks). Input features that are never active on the data (``H_jj = 0``) get
  ``H_jj = 1``.

**Calibration inputs.** Wanda and SparseGPT read the input Gram matrix ``XᵀX`` of each
linear layer from the shared collector (:func:`brickwork.statistics_for` / ``collect_gram``,
padding masked). ``sequential=True`` (the default for SparseGPT, as in the paper) measures
layer ``l``'s inputs on the model whose layers ``< l`` are already pruned (one forward pass
of the pruned prefix per layer, stopped after layer ``l``, like RegMean++; inside one layer
all projections see that layer's dense inputs, as in the reference implementation);
``sequential=False`` (the default for Wanda) uses the dense model's inputs for every layer
(one cached :func:`~brickwork.statistics_for` call).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..arch import layer_name
from ..errors import DataError, RecipeError

Method = Literal["magnitude", "wanda", "sparsegpt"]
METHODS: tuple[str, ...] = ("magnitude", "sparsegpt", "wanda")
BLOCK_SIZE = 128
DAMP = 0.01

__all__ = [
    "PruneResult",
    "magnitude_mask",
    "parse_nm",
    "prune",
    "prune_model",
    "prune_module",
    "sparsegpt_prune",
    "wanda_mask",
]


# -- options -------------------------------------------------------------------------------


def parse_nm(nm: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; checks ``1 <= N < M``."""
    if nm is None:
        return None
    if isinstance(nm, str):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", nm)
        if not m:
            raise RecipeError(
                f"--nm '{nm}' is not an N:M pattern; write e.g. 2:4 (at most 2 non-zeros in "
                "every 4 consecutive input weights) or 4:8."
            )
        n, mm = int(m.group(1)), int(m.group(2))
    else:
        n, mm = (int(v) for v in nm)
    if not 1 <= n < mm:
        raise RecipeError(
            f"N:M pattern {n}:{mm}: N (non-zeros kept per group) must satisfy 1 <= N < M; "
            f"got N={n}, M={mm}. 2:4 keeps 2 of every 4 weights."
        )
    return n, mm


def check_options(sparsity: float | None, nm: tuple[int, int] | None) -> None:
    if (sparsity is None) == (nm is None):
        raise RecipeError(
            "give exactly one of sparsity (e.g. --sparsity 0.5) and an N:M pattern (--nm 2:4)."
        )
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise RecipeError(
            f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity}."
        )


def _check_nm_shape(name: str, w: torch.Tensor, nm: tuple[int, int] | None) -> None:
    """``w`` is ``(out, in)``."""
    if nm is not None and w.shape[1] % nm[1]:
        raise RecipeError(
            f"tensor '{name}': its input dimension {w.shape[1]} is not divisible by M={nm[1]} "
            f"of the N:M pattern {nm[0]}:{nm[1]}; choose an M that divides it, or use "
            "--sparsity for unstructured pruning."
        )


# -- masks (weights as (out, in); True = kept) ------------------------------------------------


def _keep_largest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Mask of ``scores`` (any shape) with its ``n_prune`` smallest entries pruned (exactly
    that many; among entries equal to the threshold the first ones by position go). A
    ``kthvalue`` threshold, not a ``topk``: memory is the scores and one bool mask, not
    ``n_prune`` values and int64 indices besides."""
    flat = scores.reshape(-1)
    if n_prune <= 0:
        return torch.ones(scores.shape, dtype=torch.bool)
    if n_prune >= flat.numel():
        return torch.zeros(scores.shape, dtype=torch.bool)
    v = _kth_smallest_int16(flat, n_prune) if flat.dtype == torch.int16 else None
    if v is None:
        v = torch.kthvalue(flat, n_prune).values
    keep = flat > v
    ties = torch.nonzero(flat == v).flatten()  # pruned so far: the entries below v
    left = n_prune - (flat.numel() - int(keep.sum()) - ties.numel())
    keep[ties[left:]] = True
    return keep.reshape(scores.shape)


def _kth_smallest_int16(flat: torch.Tensor, k: int) -> int | None:
    """The ``k``-th smallest (1-based) of non-negative int16 ``flat`` by counting, in chunks:
    memory is 32768 counters and one int64 chunk, not ``kthvalue``'s copy of the input and
    its int64 indices (issue 12). ``None`` if ``flat`` holds a negative value."""
    counts = torch.zeros(1 << 15, dtype=torch.int64)
    step = 1 << 18
    for i in range(0, flat.numel(), step):
        part = flat[i : i + step].to(torch.int64)  # (≤ step,)
        if int(part.min()) < 0:
            return None
        counts += torch.bincount(part, minlength=1 << 15)
    return int(torch.searchsorted(counts.cumsum(0), k))


def _magnitude_bits(w: torch.Tensor) -> torch.Tensor:
    """|w| of a 16-bit float tensor as its int16 bit patterns (sign bit cleared): for
    non-negative floats the bit pattern orders exactly as the value, so thresholds and ties
    are those of ``|w|``, at 2 bytes an entry instead of a float32 copy."""
    return w.contiguous().view(torch.int16) & 0x7FFF


def _mask_rows(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, the ``round(s · in)`` lowest scores pruned. ``scores`` (out, in)."""
    k = round(sparsity * scores.shape[1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices  # (out, k)
        keep.scatter_(1, idx, False)
    return keep


def _mask_nm(scores: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """In every group of M consecutive inputs of a row the N highest scores kept."""
    n, m = nm
    out, cols = scores.shape
    groups = scores.reshape(out, cols // m, m)  # (out, groups, M)
    idx = torch.topk(groups, m - n, dim=2, largest=False, sorted=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, idx, False)
    return keep.reshape(out, cols)


def magnitude_mask(
    w: torch.Tensor, *, sparsity: float | None = None, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Keep-mask of ``w`` (out, in) by ``|W|``: the ``round(s · numel)`` smallest pruned, or
    N:M along the input axis."""
    if nm is None and w.dtype in (torch.bfloat16, torch.float16):
        return _keep_largest(_magnitude_bits(w.detach()), round(float(sparsity or 0.0) * w.numel()))
    a = w.detach().abs().float()
    if nm is not None:
        return _mask_nm(a, nm)
    return _keep_largest(a, round(float(sparsity or 0.0) * a.numel()))


def wanda_scores(w: torch.Tensor, gram_diag: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖₂`` with ``‖X_j‖₂ = sqrt((XᵀX)_jj)``; ``w`` (out, in), ``gram_diag`` (in,)."""
    norms = gram_diag.double().clamp_min(0).sqrt().float()  # (in,)
    return w.detach().abs().float() * norms.unsqueeze(0)


def wanda_mask(
    w: torch.Tensor,
    gram_diag: torch.Tensor,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Wanda's keep-mask of ``w`` (out, in): the top scores of each output row (or N:M group)."""
    s = wanda_scores(w, gram_diag)
    return _mask_nm(s, nm) if nm is not None else _mask_rows(s, float(sparsity or 0.0))


def sparsegpt_prune(
    w: torch.Tensor,
    gram: torch.Tensor,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = BLOCK_SIZE,
    damp: float = DAMP,
) -> torch.Tensor:
    """SparseGPT on one weight ``w`` (out, in) with input Gram matrix ``gram = XᵀX`` (in, in):
    the pruned and updated weight (float32; see the module docstring)."""
    if sparsity is not None and sparsity == 0.0 and nm is None:
        return w.detach().float().clone()
    W = w.detach().float().clone()  # (out, in)
    cols = W.shape[1]
    H = gram.detach().double().clone()  # (in, in)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        U = torch.linalg.cholesky(Hinv, upper=True).float()  # (in, in), upper
    except torch.linalg.LinAlgError:
        raise DataError(
            f"SparseGPT: the damped Hessian (in={cols}) is not positive definite; give more "
            "calibration data (--n-examples) or a larger damping."
        ) from None
    if nm is not None and block_size % nm[1]:
        block_size = nm[1] * max(1, block_size // nm[1])
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (out, b)
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]  # (b, b)
        d = torch.diag(U1)  # (b,)
        if nm is None:
            score = W1.square() / d.square().unsqueeze(0)
            keep = _keep_largest(score, round(float(sparsity) * score.numel()))
        else:
            keep = torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                score = W1[:, g].square() / d[g].square().unsqueeze(0)  # (out, M)
                keep[:, g] = _mask_nm(score, nm)
            col = W1[:, i]
            q = torch.where(keep[:, i], col, torch.zeros_like(col))
            Q1[:, i] = q
            err = (col - q) / U1[i, i]  # (out,)
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W


# -- which tensors -----------------------------------------------------------------------------


def prunable_names(names: Iterable[str]) -> list[str]:
    """Linear weights inside the transformer layers (see the module docstring)."""
    return [n for n in names if n.endswith(".weight") and layer_name(n) is not None]


def _as_out_in(t: torch.Tensor, input_axis: int) -> torch.Tensor:
    return t if input_axis == 1 else t.T


def _tensor_axes(config: dict[str, Any] | None, names: list[str]) -> dict[str, int]:
    """Input axis of each prunable 2-D tensor, from the architecture layout (GPT-2's
    ``Conv1D`` stores ``(in, out)``); ``nn.Linear`` (axis 1) when the model type is unknown."""
    from ..arch.transformer import transformer_layout
    from ..errors import AlignError

    axes: dict[str, int] = {}
    try:
        layout = transformer_layout(config or {}, names)
    except AlignError:
        layout = None
    if layout is not None:
        for part in layout.layers:
            projs = [part.q, part.k, part.v, part.o, *part.ffn_in, part.ffn_out]
            for p in projs:
                axes[p.weight] = p.in_axis
    conv1d = (config or {}).get("model_type") == "gpt2"
    for n in names:
        axes.setdefault(n, 0 if conv1d else 1)
    return axes


# -- module level (Wanda, SparseGPT, magnitude on a module) -----------------------------------


@dataclass
class PruneResult:
    """The pruned weights (name -> tensor in the model's own layout and dtype) and what was
    measured: per tensor the fraction of zeros."""

    tensors: dict[str, torch.Tensor]
    sparsity: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def overall(self) -> float:
        total = sum(t.numel() for t in self.tensors.values())
        zeros = sum(int((t == 0).sum()) for t in self.tensors.values())
        return zeros / max(total, 1)


def _prune_one(
    method: str,
    name: str,
    w: torch.Tensor,
    axis: int,
    gram: torch.Tensor | None,
    sparsity: float | None,
    nm: tuple[int, int] | None,
) -> torch.Tensor:
    """One weight in its stored layout -> pruned copy in the same layout and dtype."""
    wo = _as_out_in(w.detach(), axis)  # (out, in)
    _check_nm_shape(name, wo, nm)
    if method == "magnitude":
        new = wo * magnitude_mask(wo, sparsity=sparsity, nm=nm)
    elif gram is None:
        raise DataError(
            f"tensor '{name}': method '{method}' needs the input statistics (XᵀX) of its layer "
            "and none were measured; pass calibration data (--data) that reaches this layer."
        )
    elif method == "wanda":
        new = wo * wanda_mask(wo, torch.diag(gram), sparsity=sparsity, nm=nm)
    else:
        new = sparsegpt_prune(wo, gram, sparsity=sparsity, nm=nm)
    return _as_out_in(new, axis).to(w.dtype).contiguous()


def _stages(names: list[str]) -> list[tuple[str, list[str]]]:
    """Prunable weights grouped by layer, in order ("<prefix><index>")."""
    order: dict[str, list[str]] = {}
    for n in names:
        ln = layer_name(n)
        if ln is None:
            raise RecipeError(
                f"tensor '{n}' is not inside a numbered transformer layer, so it has no place "
                "in the layer-by-layer order of sequential pruning; leave it out of the pruned set."
            )
        order.setdefault(f"{ln.prefix}{ln.index}", []).append(n)
    return list(order.items())


def prune_module(
    model: nn.Module,
    method: Method,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | str | None = None,
    batches: Sequence[Any] | None = None,
    sequential: bool | None = None,
    model_hash: str | None = None,
    progress: bool = False,
) -> PruneResult:
    """Prune the linear layers inside the transformer layers of ``model`` (not modified).

    ``batches``: calibration batches (Wanda, SparseGPT). ``sequential``: measure each
    layer's inputs on the already-pruned prefix (default: True for SparseGPT, False for
    Wanda). Returns the pruned tensors by state-dict name."""
    from ..stats.collect import StopForward, _eval, collect_gram, linear_modules

    nm = parse_nm(nm)
    check_options(sparsity, nm)
    if method not in METHODS:
        from ..errors import unknown_name

        raise unknown_name("pruning method", method, METHODS)
    if method != "magnitude" and not batches:
        raise DataError(
            f"method '{method}' needs calibration data (the inputs of each linear layer); "
            "give text files with --data FILE (tokenised with the model's tokenizer) or "
            "batches=[...] in Python. Magnitude pruning needs none."
        )
    layers = {n: v for n, v in linear_modules(model).items() if layer_name(n) is not None}
    if not layers:
        raise RecipeError(
            f"{type(model).__name__}: no Linear / Conv1D weights inside numbered transformer "
            "layers ('...layers.N.' / 'h.N.'), so there is nothing to prune."
        )
    names = [n for n in model.state_dict() if n in layers]
    for n in names:
        m, axis = layers[n]
        _check_nm_shape(n, _as_out_in(m.weight, axis), nm)
    if sequential is None:
        sequential = method == "sparsegpt"
    out: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {"sequential": bool(sequential and method != "magnitude")}
    if method == "magnitude":
        for n in names:
            m, axis = layers[n]
            out[n] = _prune_one(method, n, m.weight, axis, None, sparsity, nm)
    elif not sequential:
        from ..stats import statistics_for

        stats = statistics_for(model, list(batches or []), "gram", model_hash=model_hash)
        info["statistics"] = {"path": str(stats.path), "cache_hit": stats.hit}
        info["data_hash"] = stats.info.get("data_hash")
        for i, n in enumerate(names):
            m, axis = layers[n]
            g = stats.get(n)
            if g is None:
                raise DataError(f"tensor '{n}': the collector measured no inputs for it.")
            out[n] = _prune_one(method, n, m.weight, axis, g, sparsity, nm)
            if progress:
                print(f"  pruned {n} ({i + 1}/{len(names)})", flush=True)
    else:
        from ..stats.store import data_hash

        batches = list(batches or [])
        info["data_hash"] = data_hash(batches, {"kind": "gram"})
        work = copy.deepcopy(model)

        def stop(*_: Any) -> None:
            raise StopForward

        with torch.no_grad(), _eval(work):
            for key, stage in _stages(names):
                block = work.get_submodule(key)
                handle = block.register_forward_hook(stop)
                try:
                    grams = collect_gram(work, batches, where="model", only=set(stage))
                finally:
                    handle.remove()
                wl = linear_modules(work)
                for n in stage:
                    mod, axis = wl[n]
                    out[n] = _prune_one(
                        method, n, layers[n][0].weight, axis, grams[n].sum, sparsity, nm
                    )
                    mod.weight.copy_(out[n])
                if progress:
                    print(f"  pruned {key} ({len(stage)} tensors)", flush=True)
    sp = {n: float((t == 0).sum()) / t.numel() for n, t in out.items()}
    return PruneResult(out, sp, info)


# -- tensor level (magnitude, streamed) -----------------------------------------------------


def _global_threshold(ck: Any, names: list[str], axes: dict[str, int], sparsity: float) -> Any:
    """The per-tensor numbers of weights to prune so that exactly ``round(s · total)`` of all
    pruned tensors' weights go, smallest ``|W|`` first (ties by tensor order)."""
    mags = [ck.get(n).detach().abs().float().reshape(-1) for n in names]
    flat = torch.cat(mags)  # (total,)
    k = round(sparsity * flat.numel())
    counts: dict[str, int] = dict.fromkeys(names, 0)
    if k == 0:
        return counts
    idx = torch.topk(flat, k, largest=False, sorted=False).indices
    owner = torch.bucketize(idx, torch.tensor([m.numel() for m in mags]).cumsum(0), right=True)
    for i, c in zip(*torch.unique(owner, return_counts=True)):
        counts[names[int(i)]] = int(c)
    del flat, mags
    return counts


def prune(
    model: str | Path,
    out: str | Path,
    *,
    method: Method = "magnitude",
    sparsity: float | None = None,
    nm: tuple[int, int] | str | None = None,
    scope: Literal["layer", "global"] = "layer",
    data: Sequence[str | Path] = (),
    n_examples: int = 128,
    batch_size: int = 8,
    max_length: int = 128,
    sequential: bool | None = None,
    force: bool = False,
    shard_size: str | int = "5GB",
    progress: bool = False,
) -> Path:
    """Prune the Hugging Face model (or safetensors checkpoint, for magnitude) at ``model``
    and write it to ``out`` (same architecture, zeros in the weights) with provenance in
    ``brickwork.json`` and a model card. See the module docstring for the methods."""
    from ..checkpoint.reader import open_checkpoint
    from ..checkpoint.writer import CheckpointWriter
    from ..errors import OutputExistsError
    from ..merge.api import check_output_is_not_input

    nm = parse_nm(nm)
    check_options(sparsity, nm)
    if method not in METHODS:
        from ..errors import unknown_name

        raise unknown_name("pruning method", method, METHODS)
    if scope not in ("layer", "global"):
        raise RecipeError(f"scope must be 'layer' or 'global', got '{scope}'.")
    if scope == "global" and (method != "magnitude" or nm is not None):
        raise RecipeError(
            "scope 'global' (one threshold over all pruned tensors) applies to unstructured "
            "magnitude pruning only; Wanda compares per output row, SparseGPT per block, and "
            "N:M per group."
        )
    if method != "magnitude" and not data:
        raise DataError(
            f"method '{method}' needs calibration data: give one or more text files with "
            "--data FILE (tokenised with the model's tokenizer; also .jsonl or a .safetensors "
            "of input_ids). Magnitude pruning needs none."
        )
    if method == "magnitude" and data:
        raise RecipeError(
            "magnitude pruning uses no calibration data, but --data was given; remove it or "
            "choose --method wanda / sparsegpt."
        )
    ck = open_checkpoint(model)
    out = Path(out).expanduser()
    check_output_is_not_input(out, {str(model): ck})
    if out.exists() and not force:
        raise OutputExistsError(
            f"{out}: already exists. Choose another output path or pass --force to replace it."
        )
    names = list(ck.names)
    targets = prunable_names(names)
    targets = [
        n for n in targets if len(ck.info(n).shape) == 2 and ck.info(n).dtype.is_floating_point
    ]
    if not targets:
        raise RecipeError(
            f"{model}: no 2-D weights inside numbered transformer layers ('...layers.N.' / "
            "'h.N.'), so there is nothing to prune."
        )
    record: dict[str, Any] = {
        "kind": "compress.prune",
        "method": method,
        "sparsity": sparsity,
        "nm": f"{nm[0]}:{nm[1]}" if nm else None,
        "nm_convention": "at most N non-zeros in every M consecutive input weights of a row"
        if nm
        else None,
        "scope": scope if method == "magnitude" else None,
    }
    pruned: dict[str, torch.Tensor] | None = None
    counts: dict[str, int] | None = None
    axes = _tensor_axes(ck.config, names)
    if method == "magnitude":
        for n in targets:
            info = ck.info(n)
            cols = info.shape[axes[n]]
            if nm is not None and cols % nm[1]:
                _check_nm_shape(n, torch.empty(0, cols), nm)
        if scope == "global":
            counts = _global_threshold(ck, targets, axes, float(sparsity))
    else:
        from ..recipe import DataSpec
        from ..stats.data import load_batches, load_hf_module

        where = f"model {model}"
        module = load_hf_module(Path(model), where)
        vocab = getattr(getattr(module, "config", None), "vocab_size", None)
        batches: list[Any] = []
        data_records = []
        for f in data:
            spec = DataSpec(
                path=str(f), n_examples=n_examples, batch_size=batch_size, max_length=max_length
            )
            bs = load_batches(spec, model_dir=ck.model_dir, vocab_size=vocab, where=where)
            batches += bs
            data_records.append({"path": str(f), "sha256": _file_hash(Path(f))})
        res = prune_module(
            module,
            method,
            sparsity=sparsity,
            nm=nm,
            batches=batches,
            sequential=sequential,
            model_hash=None,
            progress=progress,
        )
        pruned = _to_checkpoint_names(res.tensors, names, str(model))
        targets = list(pruned)
        record |= {
            "calibration": {
                "files": data_records,
                "n_examples": n_examples,
                "batch_size": batch_size,
                "max_length": max_length,
                "tokens": sum(
                    int(b["attention_mask"].sum())
                    if "attention_mask" in b
                    else b["input_ids"].numel()
                    for b in batches
                ),
                "data_hash": res.info.get("data_hash"),
            },
            "sequential": res.info["sequential"],
            "block_size": BLOCK_SIZE if method == "sparsegpt" else None,
            "damp": DAMP if method == "sparsegpt" else None,
        }
        del module
    measured: dict[str, float] = {}
    zeros_total = numel_total = 0
    target_set = set(targets)
    infos = [ck.info(n) for n in names]
    with CheckpointWriter(
        out, infos, force=force, shard_size=shard_size, side_files=ck.model_dir
    ) as writer:
        for n in names:
            if n not in target_set:  # passed through: copied in chunks, never held whole
                writer.copy(n, ck)
                continue
            if pruned is not None:
                t = pruned.pop(n)
            else:
                t = _prune_magnitude_tensor(n, ck.get(n), axes[n], sparsity, nm, counts)
            z = int((t == 0).sum())
            measured[n] = z / t.numel()
            zeros_total += z
            numel_total += t.numel()
            writer.write(n, t)
            del t
        record["measured_sparsity"] = {
            "overall": zeros_total / max(numel_total, 1),
            "pruned_tensors": len(measured),
            "pruned_weights": numel_total,
            "per_tensor": measured,
        }
        _write_provenance(writer, ck, str(model), record)
    return out


def _to_checkpoint_names(
    tensors: dict[str, torch.Tensor], names: list[str], where: str
) -> dict[str, torch.Tensor]:
    """The module's tensor names as the checkpoint's: a config without ``architectures``
    loads as the bare model (``layers.0...``) while the file holds ``model.layers.0...``."""
    present = set(names)
    first = next(iter(tensors))
    prefixes = [c[: -len(first)] for c in names if c.endswith(first)]
    for prefix in sorted(prefixes, key=len):
        if all(prefix + n in present for n in tensors):
            return {prefix + n: t for n, t in tensors.items()}
    raise RecipeError(
        f"{where}: the loaded module's tensor names ({first}, ...) are not the checkpoint's; "
        "save the model with save_pretrained and prune that."
    )


def _prune_magnitude_tensor(
    name: str,
    t: torch.Tensor,
    axis: int,
    sparsity: float | None,
    nm: tuple[int, int] | None,
    counts: dict[str, int] | None,
) -> torch.Tensor:
    if counts is None:
        return _prune_one("magnitude", name, t, axis, None, sparsity, nm)
    keep = _keep_largest(t.detach().abs().float(), counts[name])
    return (t * keep).to(t.dtype)


def _file_hash(path: Path) -> str | None:
    import hashlib

    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _write_provenance(writer: Any, ck: Any, key: str, record: dict[str, Any]) -> None:
    from ..checkpoint.provenance import environment

    env = environment()
    record = {**record, "inputs": {key: ck.checksum()}, "environment": env}
    writer.add_text("brickwork.json", json.dumps(record, indent=2, default=str) + "\n")
    what = f"{record['nm']} (N:M)" if record["nm"] else f"{record['sparsity']:.0%} unstructured"
    ms = record["measured_sparsity"]
    refs = {
        "magnitude": "keep the largest |W|",
        "wanda": "Sun et al. 2023, arXiv:2306.11695",
        "sparsegpt": "Frantar & Alistarh 2023, arXiv:2301.00774",
    }
    lines = [
        "---",
        "library_name: transformers",
        "tags: [pruned, sparse, brickwork]",
        "---",
        f"# Pruned model ({record['method']}, {what})",
        "",
        f"Made with brickwork {env['brickwork']} on {env['created']} from `{key}` "
        f"(sha256 first 16: `{record['inputs'][key]}`).",
        "",
        f"**Method:** `{record['method']}` ({refs[record['method']]}).",
        "",
        "Pruned: every Linear / Conv1D weight inside the transformer layers; embeddings, "
        "LM head, norms and biases unchanged. Pruned weights are stored as zeros (dense "
        "tensors, same architecture).",
        "",
        f"**Measured sparsity** of the {ms['pruned_tensors']} pruned tensors "
        f"({ms['pruned_weights']} weights): {ms['overall']:.4f}.",
        "",
    ]
    if "calibration" in record:
        c = record["calibration"]
        files = ", ".join(f"`{f['path']}`" for f in c["files"])
        lines += [
            f"**Calibration:** {files}; {c['n_examples']} examples of at most "
            f"{c['max_length']} tokens ({c['tokens']} tokens); sequential: "
            f"{record['sequential']}; data hash `{c['data_hash']}`.",
            "",
        ]
    writer.add_text("README.md", "\n".join(lines))


# ``brickwork.compress.prune`` is this module, so the function is exported under another name.
prune_model = prune
