"""The LM suite's compression rows (issue 12): every fine-tune compressed on its own.

Rows (names and options from :data:`brickwork.bench.compress_names.COMPRESS_ROWS`, kind
``"compress"``): ``lora_r8`` / ``lora_r32`` / ``lora_r128`` (the fine-tune as base + a LoRA
adapter of that rank, extracted by :func:`brickwork.compress.extract_lora`, the code path of
``brickwork compress lora``), ``magnitude_50``, ``wanda_50`` / ``wanda_2of4``,
``sparsegpt_50`` / ``sparsegpt_2of4`` (:func:`brickwork.compress.prune_module`, the pruning
of ``brickwork compress prune``: the Linear weights inside the transformer layers; embeddings,
LM head and norms dense) and ``svd_llm_20`` / ``svd_llm_40`` (:func:`brickwork.compress.
factorize_model` with ``method="svd_llm"`` at parameter ratio 0.8 / 0.6 of the factorised
layers, i.e. 20 % / 40 % fewer; SVD-LLM, Wang et al. 2024, arXiv:2403.07378).

Like ``individual``, each domain is scored with its own compressed fine-tune, so
*normalized* is the share of each fine-tune's loss gain over the base that compression keeps
(the suite's bootstrap intervals, :func:`brickwork.bench.lm_rows.score_rows`). Nothing is
chosen: the options are fixed by the row's name, no validation read; each domain's test split
is read once per row, after compression.

Calibration (Wanda, SparseGPT, SVD-LLM): per domain :data:`CALIB_SEQS` packed sequences of
that domain's fine-tuning documents (:func:`brickwork.bench.lm_rows.calibration`, the data
the fine-tune was trained on; never val or test), as in ``benchmarks/compress_prune.py lm``;
Wanda on the dense model's inputs, SparseGPT sequential (each layer's inputs from the
already-pruned prefix), the library's defaults.

The LoRA rows apply the adapter in memory: ``W = W_base + B A`` for every module with an
adapter (``(B A)ᵀ`` for the embedding, as PEFT adds it), and the adapter's
``modules_to_save`` tensors (the norms) at their fine-tuned values; a rank above a module's
smaller side cannot apply and the row is skipped with the reason (on the quick models,
hidden 32, ``lora_r128``).

Columns:

* ``params``: stored parameters summed over the per-domain models (as ``individual`` counts
  them). Pruned: the non-zeros of the pruned tensors plus every other tensor's size.
  LoRA: the base once plus each domain's adapter tensors (A, B and the kept tensors).
  Low-rank: the factorised model's parameters (factor sizes plus the dense tensors).
* ``active_params``: parameters one token passes through, the mean over domains of one
  model's count: the pruned model's non-zeros; for LoRA the base's size (the adapter merged
  into the weights when the model is loaded, as it is evaluated here); the factorised model's
  size.
* ``latency_ms``: :func:`brickwork.bench.lm_rows.latency_ms`, one fixed batch of validation
  sequences, min over repeats, per sequence, the mean over the domains' models; measured the
  same way for the reference rows. The pruned weights are stored dense (zeros in place), and dense kernels
  on CPU do not skip zeros, so the pruned rows run at dense speed; 2:4 speed-ups need
  sparse tensor cores (or a sparse format), which this suite does not use.
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import BrickworkError
from .compress_names import COMPRESS_ROWS
from .lm_rows import (
    Evaluator,
    _lm_batches,
    advance,
    calibration,
    latency_batch,
    latency_ms,
    new_row,
)
from .lm_train import Models
from .train import load_row, save_row, source_hash

#: Calibration sequences per fine-tune (its own fine-tuning documents), as in
#: ``benchmarks/compress_prune.py``.
CALIB_SEQS = 64

__all__ = ["CALIB_SEQS", "compress_key", "compress_rows"]


@functools.cache  # once per process, like the suite's other code hashes
def _compress_code() -> str:
    h = hashlib.sha256(source_hash("compress", "stats").encode())
    here = Path(__file__).resolve().parent
    for f in ("lm_compress_rows.py", "compress_names.py"):
        h.update((here / f).read_bytes())
    return h.hexdigest()[:16]


def compress_key(row_key: Callable[[str], str], name: str) -> str:
    """The row-cache key of compression row ``name`` (the compress and statistics code in it)."""
    return row_key(f"compress:{name}:{_compress_code()}")


# ----------------------------------------------------------------------------- one model each


def _lora(models: Models, d: str, opts: dict[str, Any], work: Path) -> tuple[Any, int, int]:
    """(fine-tune rebuilt as base + rank-r adapter, stored adapter params, active params)."""
    from safetensors.torch import load_file

    from ..compress import extract_lora
    from ..compress.lora import ADAPTER_FILE

    out = extract_lora(models.dir(models.keys[d]), work / f"lora-{d}",
                       base=models.dir(models.base_key), rank=int(opts["rank"]))  # fmt: skip
    ad = load_file(str(out / ADAPTER_FILE))
    model = models.load(models.base_key)
    state = model.state_dict()
    prefix = "base_model.model."
    with torch.no_grad():
        for name, t in ad.items():
            n = name.removeprefix(prefix)
            if n.endswith(".lora_A.weight"):  # Linear: W += B A, (out, r) @ (r, in)
                mod = n.removesuffix(".lora_A.weight")
                b = ad[f"{prefix}{mod}.lora_B.weight"]
                state[f"{mod}.weight"] += (b.float() @ t.float()).to(state[f"{mod}.weight"].dtype)
            elif n.endswith(".lora_embedding_A"):  # Embedding (vocab, d): W += (B A)ᵀ
                mod = n.removesuffix(".lora_embedding_A")
                b = ad[f"{prefix}{mod}.lora_embedding_B"]
                state[f"{mod}.weight"] += (b.float() @ t.float()).T.to(state[f"{mod}.weight"].dtype)
            elif n.endswith(".base_layer.bias"):  # a targeted module's changed bias
                state[n.replace(".base_layer.bias", ".bias")].copy_(t)
            elif n in state:  # modules_to_save: the fine-tune's value
                state[n].copy_(t)
            elif not n.endswith((".lora_B.weight", ".lora_embedding_B")):
                raise BrickworkError(f"adapter tensor '{name}' of {out} has no place in the model")
    n_base = sum(v.numel() for v in state.values())
    return model, sum(t.numel() for t in ad.values()), n_base


def _prune(
    models: Models, d: str, opts: dict[str, Any], calib: torch.Tensor
) -> tuple[Any, int, int]:
    """(pruned fine-tune, its stored non-zeros, the same as active params)."""
    from ..compress import prune_module

    model = models.load(models.keys[d])
    method = str(opts["method"])
    res = prune_module(model, method,  # type: ignore[arg-type]
                       sparsity=opts.get("sparsity"), nm=opts.get("nm"),
                       batches=None if method == "magnitude" else _lm_batches(calib),
                       model_hash=models.keys[d])  # fmt: skip
    state = model.state_dict()
    with torch.no_grad():
        for n, t in res.tensors.items():
            state[n].copy_(t)
    n = sum(int(torch.count_nonzero(v)) if k in res.tensors else v.numel()
            for k, v in state.items())  # fmt: skip
    return model, n, n


def _lowrank(
    models: Models, d: str, opts: dict[str, Any], calib: torch.Tensor
) -> tuple[Any, int, int]:
    """(factorised fine-tune, its parameters, the same as active params)."""
    from ..compress import factorize_model, gram_statistics

    ft = models.load(models.keys[d])
    grams = gram_statistics(ft, _lm_batches(calib), where=f"fine-tune {d}")
    model, _ = factorize_model(ft, method=str(opts["method"]), ratio=float(opts["ratio"]),
                               grams=grams)  # fmt: skip
    n = sum(v.numel() for v in model.state_dict().values())
    return model, n, n


# ----------------------------------------------------------------------------- the rows


def compress_rows(
    models: Models,
    ev: Evaluator,
    names: Sequence[str],
    *,
    row_key: Callable[[str], str],
    reused: list[str],
    bar: Callable[[str, int], Any],
) -> list[dict[str, Any]]:
    """One row per compression row name (cached); each keeps its per-sequence test losses in
    ``_losses`` (each domain scored by its own compressed fine-tune)."""
    domains = list(models.keys)
    n_base = sum(v.numel() for v in models.state(models.base_key).values())
    batch = latency_batch(ev)
    calib: dict[str, torch.Tensor] | None = None
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="brickwork-lm-compress-") as tmp,
        bar("compress each fine-tune", len(names)) as b,
    ):
        for name in names:
            key = compress_key(row_key, name)
            if (cached := load_row(key)) is not None:
                rows.append(cached)
                reused.append(name)
                advance(b)
                continue
            kind, opts = COMPRESS_ROWS[name]
            needs_data = kind == "lowrank" or (kind == "prune" and opts["method"] != "magnitude")
            if needs_data and calib is None:
                calib = calibration(models, CALIB_SEQS)
            t0 = time.perf_counter()
            losses, stored, active, lat = {}, 0, [], []
            try:
                for d in domains:
                    if kind == "lora":
                        model, extra, act = _lora(models, d, opts, Path(tmp))
                        stored += extra
                    elif kind == "prune":
                        model, n, act = _prune(models, d, opts, calib[d] if calib else None)
                        stored += n
                    else:
                        model, n, act = _lowrank(models, d, opts, calib[d])  # type: ignore[index]
                        stored += n
                    losses |= ev.losses(model, "test", [d])  # each domain's only test read
                    active.append(act)
                    lat.append(latency_ms(model, batch))
                    del model
            except BrickworkError as e:
                rows.append(new_row(name, "compress", status="skipped", reason=str(e),
                                    hyperparameters=dict(opts),
                                    seconds=round(time.perf_counter() - t0, 2)))  # fmt: skip
            else:
                rows.append(new_row(
                    name, "compress", hyperparameters=dict(opts),
                    params=stored + (n_base if kind == "lora" else 0),
                    active_params=round(sum(active) / len(active)),
                    latency_ms=round(sum(lat) / len(lat), 4),
                    seconds=round(time.perf_counter() - t0, 2),
                    statistics={"split": "train", "examples_per_model": CALIB_SEQS,
                                "seq_len": models.cfg.seq_len} if needs_data else None,
                    _losses={d: v.tolist() for d, v in losses.items()},
                ))  # fmt: skip
            save_row(key, rows[-1])
            advance(b)
    return rows
