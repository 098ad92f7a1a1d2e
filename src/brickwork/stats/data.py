"""Calibration data for data-aware merges, and Hugging Face models to run it through.

A recipe's per-model ``data:`` block (:class:`brickwork.recipe.DataSpec`) names one of

* a text file (``.txt``; one example per non-empty line) or a folder of ``*.txt`` files,
  tokenised with **the model's own tokenizer** (the files of its directory);
* a JSONL file, one JSON object per line, the text under ``field`` (default ``text``) and,
  for the empirical Fisher, an integer label under ``label_field``;
* a safetensors file of input tensors (``input_ids`` and optionally ``attention_mask``,
  ``token_type_ids``, ``labels``, ...; every tensor's first axis is the example).

``n_examples`` caps how many examples are read, ``batch_size`` groups them, ``max_length``
truncates tokenised text (padding to the longest sequence of each batch; the attention
mask marks the padding, which the statistics leave out).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError


def _format_of(path: Path, given: str | None) -> str:
    if given is not None:
        return given
    if path.is_dir():
        return "text"
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text"):
        return "text"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".safetensors":
        return "safetensors"
    raise DataError(
        f"{path}: cannot tell the calibration data's format from the suffix '{path.suffix}'; "
        "expected .txt (or a folder of .txt files), .jsonl or .safetensors, or give "
        "'format: text | jsonl | safetensors' in the data block."
    )


def _texts(path: Path, fmt: str, field: str, label_field: str | None, n: int, where: str):
    texts: list[str] = []
    labels: list[int] = []
    if fmt == "text":
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{where}: data folder {path} holds no .txt files.")
        for f in files:
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    texts.append(line)
                if len(texts) >= n:
                    return texts, None
        return texts, None
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"{path}, line {lineno}: no text field '{field}' (found: {keys}). Set "
                "'field:' in the data block to the key that holds the text."
            )
        texts.append(row[field])
        if label_field is not None:
            if not isinstance(row.get(label_field), int):
                raise DataError(
                    f"{path}, line {lineno}: label field '{label_field}' is missing or not an "
                    f"integer (got {row.get(label_field)!r})."
                )
            labels.append(row[label_field])
        if len(texts) >= n:
            break
    return texts, (labels if label_field is not None else None)


def load_tokenizer(model_dir: Path | None, where: str) -> Any:
    from transformers import AutoTokenizer

    if model_dir is None or not any(
        (model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    ):
        raise DataError(
            f"{where}: text calibration data is tokenised with the model's own tokenizer, but "
            f"{model_dir or 'the model'} has no tokenizer files (tokenizer.json, "
            "tokenizer_config.json). Save the tokenizer into the model directory, or give "
            "a safetensors file of input_ids instead."
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many kinds here
        raise DataError(
            f"{where}: cannot load the tokenizer of {model_dir} ({str(e).splitlines()[0][:200]})."
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_batches(
    spec: Any,
    *,
    model_dir: Path | None,
    vocab_size: int | None,
    where: str,
    recipe_dir: Path | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The calibration batches of one model's ``data:`` block (see the module docstring)."""
    path = Path(spec.path).expanduser()
    if not path.exists() and recipe_dir is not None and (recipe_dir / path).exists():
        path = recipe_dir / path
    if not path.exists():
        raise DataError(f"{where}: data path {spec.path}: no such file or directory.")
    fmt = _format_of(path, spec.format)
    if fmt == "safetensors":
        columns = _read_tensors(path, where)
    else:
        texts, labels = _texts(path, fmt, spec.field, spec.label_field, spec.n_examples, where)
        if not texts:
            raise DataError(f"{where}: {path} holds no examples (no non-empty text).")
        tok = load_tokenizer(model_dir, where)
        enc = tok(
            texts, truncation=True, max_length=spec.max_length, padding=True, return_tensors="pt"
        )
        columns = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        if labels is not None:
            columns["labels"] = torch.tensor(labels)
    n = min(spec.n_examples, next(iter(columns.values())).shape[0])
    ids = columns.get("input_ids")
    if ids is not None and vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise DataError(
            f"{where}: the calibration data holds token id {int(ids.max())}, but the model's "
            f"vocabulary has {vocab_size} entries (ids 0 to {vocab_size - 1}): the data was "
            "tokenised for another model. Tokenise it with this model's tokenizer (give "
            "text) or regenerate the input_ids."
        )
    batches = []
    for start in range(0, n, spec.batch_size):
        end = min(n, start + spec.batch_size)
        batch = {k: v[start:end] for k, v in columns.items()}
        if "attention_mask" in batch and fmt != "safetensors":
            keep = int(batch["attention_mask"].sum(-1).max())  # trim padding of this batch
            batch = {
                k: v[:, :keep] if v.dim() == 2 and k != "labels" else v for k, v in batch.items()
            }
        batches.append(batch)
    return batches


def _read_tensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        columns = load_file(str(path))
    except Exception as e:
        raise DataError(f"{where}: {path} is not a readable safetensors file ({e}).") from None
    if not columns:
        raise DataError(f"{where}: {path} holds no tensors; expected input_ids (examples, tokens).")
    sizes = {k: v.shape[0] if v.dim() else None for k, v in columns.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        shown = ", ".join(f"{k} {tuple(v.shape)}" for k, v in columns.items())
        raise DataError(
            f"{where}: {path}: every tensor's first axis must count the examples, and they "
            f"differ: {shown}."
        )
    if "input_ids" in columns and columns["input_ids"].is_floating_point():
        raise DataError(
            f"{where}: {path}: input_ids has dtype {columns['input_ids'].dtype}; token ids are "
            "integers (int64)."
        )
    return columns


def require_config(path: Path, where: str) -> Path:
    """The directory of the Hugging Face model at ``path``; an error if it has no config.json."""
    model_dir = path if path.is_dir() else path.parent
    if not (model_dir / "config.json").is_file():
        raise DataError(
            f"{where}: {path} has no config.json, so brickwork cannot build the network to "
            "run calibration data through (a plain safetensors checkpoint holds tensors, not "
            "an architecture). Give a Hugging Face model directory (config.json + weights), "
            "or merge in Python with brickwork.merge_modules(method, modules, data=...)."
        )
    return model_dir


def load_hf_module(path: Path, where: str) -> nn.Module:
    """The Hugging Face model in directory ``path`` (its config's architecture), eval mode.

    A plain safetensors file, or a directory without ``config.json``, cannot be run on data:
    brickwork does not know which network its tensors belong to."""
    import transformers

    model_dir = require_config(path, where)
    cfg = transformers.AutoConfig.from_pretrained(str(model_dir))
    archs = getattr(cfg, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    cls = cls or transformers.AutoModel
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # brickwork says what it loads; no bar per model
    try:
        model = cls.from_pretrained(str(model_dir))
    except Exception as e:
        raise DataError(
            f"{where}: transformers cannot load {model_dir} as {getattr(cls, '__name__', cls)} "
            f"({str(e).splitlines()[0][:200]})."
        ) from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.eval()
