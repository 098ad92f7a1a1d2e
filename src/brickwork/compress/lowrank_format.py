"""Saving and loading low-rank factorised models (brickwork format), and the file-level API
behind ``brickwork compress lowrank``.

The directory follows brickwork's MoE format (:mod:`brickwork.route.format`, same helpers)::

    out/
      model.safetensors      every tensor of the factorised model's state dict
      brickwork.json         {"format": "brickwork.lowrank", "format_version": 1,
                              "base": {"kind": "transformers", "class": "LlamaForCausalLM",
                                       "config": "base_config.json"},
                              "lowrank": [{"path": "model.layers.0.mlp.up_proj",
                                           "in_features": 32, "out_features": 64,
                                           "rank": 12, "bias": false}, ...],
                              "method", "settings", "parameters", "inputs", "environment"}
      base_config.json       the dense model's transformers config (not config.json, so
                             transformers refuses the directory instead of loading random
                             dense weights)
      README.md              model card; tokenizer files carried over from the input

``brickwork.load(out)`` rebuilds the dense model from ``base_config.json``, replaces each
listed module by a :class:`~brickwork.compress.lowrank.LowRankLinear` and loads every
tensor strictly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError, DataError, OutputExistsError
from .lowrank import NEEDS_DATA, LowRankLinear, factorize_model, gram_statistics, summary

FORMAT = "brickwork.lowrank"
FORMAT_VERSION = 1
META = "brickwork.json"


def save_lowrank(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    base_config: Any = None,
    copy_from: str | os.PathLike | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    provenance: Mapping[str, Any] | None = None,
    model_card: str | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
) -> Path:
    """Write ``model`` (with :class:`LowRankLinear` s) atomically in brickwork's low-rank
    format; arguments as :func:`brickwork.route.save_moe`."""
    from ..route.format import _base_description, _overlaps, write_format

    out = Path(out)
    _overlaps(out, [*inputs, *([copy_from] if copy_from is not None else [])])
    low = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not low:
        raise CheckpointError(
            f"save_lowrank: {type(model).__name__} has no LowRankLinear; factorise it first "
            "(brickwork.compress.factorize_model)."
        )
    base, config_text = _base_description(model, base_config)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base": base,
        "lowrank": [{"path": n, **m.config()} for n, m in low.items()],
    }
    return write_format(
        model, out, meta, config_text, provenance=provenance, copy_from=copy_from,
        model_card=model_card, card=_card, shard_size=shard_size, force=force,
    )  # fmt: skip


def _card(meta: Mapping[str, Any]) -> str:
    p = meta.get("parameters", {})
    lines = [
        "---",
        "tags: [low-rank, brickwork]",
        "---",
        "# Low-rank factorised model (brickwork format)",
        "",
        f"Base: `{meta['base']['class']}`; {len(meta['lowrank'])} linear layer(s) replaced by "
        "two smaller ones (`Linear(in, r, bias=False)` then `Linear(r, out)`).",
    ]
    if meta.get("method"):
        lines.append(f"\n**Method:** `{meta['method']}`; settings: `{meta.get('settings', {})}`.")
    if p:
        lines.append(
            f"\n**Parameters of the selected layers:** {p['params_before']:,} → "
            f"{p['params_after']:,} ({100 * p['kept_fraction']:.1f} % kept); "
            f"{p['layers_factorised']} of {p['layers_selected']} layers factorised."
        )
    lines += [
        "",
        "Load it with:",
        "",
        "```python",
        "import brickwork",
        "model = brickwork.load(PATH"
        + (", base=DENSE_MODULE" if meta["base"]["kind"] == "module" else "")
        + ")",
        "```",
        "",
    ]
    return "\n".join(lines)


def load_lowrank(path: str | os.PathLike, *, base: nn.Module | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save_lowrank` (``brickwork.load`` calls this)."""
    from ..route.format import _read_weights, _skeleton, replace_module

    path = Path(path).expanduser()
    f = path / META
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not readable JSON ({e}).") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{f}: field 'format_version' is {meta.get('format_version')!r}; this brickwork "
            f"reads version {FORMAT_VERSION}. Upgrade brickwork to load it."
        )
    if not isinstance(meta.get("base"), dict) or not isinstance(meta.get("lowrank"), list):
        raise CheckpointError(f"{f}: fields 'base' / 'lowrank' missing; the file is damaged.")
    model = _skeleton(path, meta, base)
    for i, e in enumerate(meta["lowrank"]):
        try:
            low = LowRankLinear(
                int(e["in_features"]), int(e["out_features"]), int(e["rank"]), bias=bool(e["bias"])
            )
            model = replace_module(model, str(e["path"]), low)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{f}: lowrank[{i}] is damaged ({err!r}).") from None
    sd = _read_weights(path)
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"{path}: a tensor does not fit the rebuilt model: {detail}."
        ) from None
    # a tied LM head is one tensor in the state dict: only truly absent tensors count
    problems = [f"missing tensor '{k}'" for k in res.missing_keys[:5]]
    problems += [f"unexpected tensor '{k}'" for k in res.unexpected_keys[:5]]
    if problems:
        raise CheckpointError(
            f"{path}: the weights do not match the rebuilt {type(model).__name__}: "
            + "; ".join(problems)
            + ". Was it written by another brickwork version, or is `base` the wrong model?"
        )
    return model.eval()


def compress_lowrank(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "svd",
    ratio: float | None = None,
    rank: int | None = None,
    data: Sequence[str | os.PathLike] = (),
    n_examples: int = 256,
    batch_size: int = 8,
    max_length: int = 128,
    alpha: float = 0.5,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    force: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Factorise the Hugging Face model in ``model_path`` and write it to ``out``
    (``brickwork compress lowrank``). Returns the output path and the parameter summary."""
    from ..checkpoint.reader import open_checkpoint
    from ..stats.data import load_batches, load_hf_module

    src = Path(model_path).expanduser()
    o = Path(out).expanduser()
    if o.exists() and not force:
        raise OutputExistsError(f"output {out} exists; pass --force to replace it.")
    from ..route.format import _overlaps

    _overlaps(o, [src, *data])
    if method in NEEDS_DATA and not data:
        raise DataError(
            f"method '{method}' needs calibration data: give one or more text files with "
            "--data FILE (one example per line, tokenised with the model's tokenizer)."
        )
    ckpt = open_checkpoint(src)
    where = str(src)
    model = load_hf_module(src, where)
    settings: dict[str, Any] = {
        "ratio": ratio,
        "rank": rank,
        "include": include,
        "exclude": list(exclude),
    }
    grams = None
    data_info: list[dict[str, Any]] = []
    if method in NEEDS_DATA:
        from ..recipe import DataSpec

        settings["alpha"] = alpha if method == "asvd" else None
        batches: list[Any] = []
        vocab = getattr(model.config, "vocab_size", None)
        for d in data:
            spec = DataSpec(
                path=str(d), n_examples=n_examples, batch_size=batch_size, max_length=max_length
            )
            b = load_batches(spec, model_dir=ckpt.model_dir, vocab_size=vocab, where=where)
            batches += b
            data_info.append({"path": str(d), **spec.model_dump(mode="json"), "batches": len(b)})
        grams = gram_statistics(model, batches, where=where)
    new, reports = factorize_model(
        model, method=method, ratio=ratio, rank=rank, grams=grams, alpha=alpha,
        include=include, exclude=exclude,
    )  # fmt: skip
    params = summary(reports)
    params["model_before"] = sum(p.numel() for p in model.parameters())
    params["model_after"] = sum(p.numel() for p in new.parameters())
    prov = {
        "kind": "compress.lowrank",
        "method": method,
        "settings": settings,
        "parameters": params,
        "inputs": {"model": {"path": str(src), "checksum": ckpt.checksum()}, "data": data_info},
        "ridges": {r.path: r.ridge for r in reports if r.ridge},
    }
    save_lowrank(
        new, o, copy_from=ckpt.model_dir, inputs=[src, *data], provenance=prov, force=force
    )
    return o, params
