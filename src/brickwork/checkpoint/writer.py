"""Atomic, streaming, sharded safetensors writer.

The plan (every output tensor's name, shape and dtype) is known before any data is
computed, so each shard's header is written first and tensor bytes are appended as
they arrive: memory stays at one tensor, whatever the shard size. Everything goes
into a temporary sibling directory that is renamed onto the output only when
complete, so the output path never holds a half-written model.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import BrickworkError, OutputExistsError, RecipeError
from .reader import DTYPE_TO_SAFETENSORS, TensorInfo

COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)


def parse_size(size: str | int) -> int:
    """``"2GB"`` / ``"500MB"`` / ``"1.5GiB"`` / ``123`` -> bytes."""
    if isinstance(size, int):
        if size <= 0:
            raise RecipeError(f"shard size must be positive, got {size}.")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise RecipeError(
            f"shard size '{size}' is not a size; write e.g. 2GB, 500MB or 1073741824."
        )
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    value = int(num * base ** "_KMGT".index(unit or "_"))
    if value <= 0:
        raise RecipeError(f"shard size must be positive, got '{size}'.")
    return value


def _header_bytes(infos: Sequence[TensorInfo], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for i in infos:
        header[i.name] = {
            "dtype": DTYPE_TO_SAFETENSORS[i.dtype],
            "shape": list(i.shape),
            "data_offsets": [offset, offset + i.nbytes],
        }
        offset += i.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class CheckpointWriter:
    """Write ``infos`` (in this order) as sharded safetensors into ``out``, atomically.

    Use as a context manager; call :meth:`write` once per tensor in plan order, then
    :meth:`add_file` / :meth:`add_text` for side files. On an exception nothing is left.
    """

    def __init__(
        self,
        out: str | Path,
        infos: Sequence[TensorInfo],
        *,
        shard_size: int | str = "5GB",
        force: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out = Path(out).expanduser().absolute()
        if self.out.exists() and not force:
            raise OutputExistsError(
                f"{self.out}: already exists. Choose another output path or pass --force to replace it."
            )
        if self.out.exists() and not self.out.is_dir():
            raise OutputExistsError(
                f"{self.out}: exists and is not a directory; refusing to replace it."
            )
        self.infos = list(infos)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = self._plan_shards(parse_size(shard_size))
        self._tmp: Path | None = None
        self._pos = 0  # index of the next tensor expected
        self._fh: BinaryIO | None = None
        self._shard_of = {i.name: s for s, shard in enumerate(self.shards) for i in shard}

    def _plan_shards(self, limit: int) -> list[list[TensorInfo]]:
        shards: list[list[TensorInfo]] = [[]]
        size = 0
        for i in self.infos:
            if shards[-1] and size + i.nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += i.nbytes
        return shards

    def shard_name(self, s: int) -> str:
        if len(self.shards) == 1:
            return "model.safetensors"
        return f"model-{s + 1:05d}-of-{len(self.shards):05d}.safetensors"

    # -- context ----------------------------------------------------------------------------
    def __enter__(self) -> CheckpointWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("CheckpointWriter used outside its `with` block")
        return self._tmp

    # -- tensors ----------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self.infos) or self.infos[self._pos].name != name:
            expected = self.infos[self._pos].name if self._pos < len(self.infos) else "nothing"
            raise RuntimeError(f"writer got '{name}' but expected {expected} (plan order)")
        info = self.infos[self._pos]
        if tuple(tensor.shape) != info.shape:
            raise BrickworkError(
                f"tensor '{name}': computed shape {tuple(tensor.shape)}, planned {info.shape}."
            )
        s = self._shard_of[name]
        if info is self.shards[s][0]:
            if self._fh is not None:
                self._fh.close()
            self._fh = open(self.tmp / self.shard_name(s), "wb")  # noqa: SIM115 (closed in write/__exit__)
            self._fh.write(_header_bytes(self.shards[s], self.metadata))
        data = tensor.detach().to(device="cpu", dtype=info.dtype).contiguous().reshape(-1)
        if data.numel():
            self._fh.write(memoryview(data.view(torch.uint8).numpy()))
        self._pos += 1

    # -- side files ----------------------------------------------------------------------
    def add_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def copy_from(self, directory: Path | None, names: Sequence[str] = COPIED_FILES) -> list[str]:
        copied = []
        if directory is None:
            return copied
        for n in names:
            src = directory / n
            if src.is_file() and not (self.tmp / n).exists():
                shutil.copyfile(src, self.tmp / n)
                copied.append(n)
        return copied

    def _finish(self) -> None:
        if self._pos != len(self.infos):
            missing = [i.name for i in self.infos[self._pos : self._pos + 3]]
            raise RuntimeError(f"writer closed before all tensors were written (next: {missing})")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(i.nbytes for i in self.infos)},
                "weight_map": {i.name: self.shard_name(self._shard_of[i.name]) for i in self.infos},
            }
            self.add_text("model.safetensors.index.json", json.dumps(index, indent=2))
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{self.tmp.name.rsplit('-', 1)[-1]}")
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
