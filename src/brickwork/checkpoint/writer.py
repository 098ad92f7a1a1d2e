"""Atomic, streaming, sharded safetensors writer.

The plan (every output tensor's name, shape and dtype) is known before any data is
computed, so each shard's header is written first and tensor bytes are appended as
they arrive: memory stays at one tensor, whatever the shard size. Everything goes
into a temporary sibling directory that is renamed onto the output only when
complete, so the output path never holds a half-written model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import BrickworkError, Interrupted, OutOfSpaceError, OutputExistsError, RecipeError
from . import staging
from .reader import DTYPE_TO_SAFETENSORS, Checkpoint, SafetensorsCheckpoint, TensorInfo
from .staging import OWNER_FILE

#: Weights and training state are never carried over from a reference model: the output
#: holds its own. Everything else a loader may need (config, tokenizer, processor configs,
#: sentence-transformers modules, chat templates) is. A skip-list, not a copy-list: a
#: copy-list misses every file type it has not heard of (issue 8).
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".ot",
    ".npz",
)
_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".pth.index.json")
#: Directories that hold no loader files: trainer snapshots, logs, caches.
_SKIPPED_DIRS = ("__pycache__", "runs", "wandb")
#: What the writer and its callers write themselves.
_OWN_FILES = ("brickwork.json", "brickwork_recipe.yaml", "README.md", OWNER_FILE)


def _is_side_file(rel: Path) -> bool:
    name = rel.name.lower()
    if any(part.startswith(".") for part in rel.parts):  # .git, .cache, .gitattributes
        return False
    if any(p in _SKIPPED_DIRS or p.startswith("checkpoint-") for p in rel.parts[:-1]):
        return False
    if name.endswith(WEIGHT_SUFFIXES) or name.endswith(_INDEX_SUFFIXES):
        return False
    return not (len(rel.parts) == 1 and rel.name in _OWN_FILES)


def list_side_files(directory: Path | None, *, exclude: Sequence[str] = ()) -> list[Path]:
    """Every non-weight file under ``directory`` (relative paths, sorted), minus ``exclude``.

    An empty folder is listed itself (it is created in the output)."""
    if directory is None or not Path(directory).is_dir():
        return []
    directory = Path(directory)
    found: list[Path] = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        here = Path(root).relative_to(directory)
        kept = [
            here / f
            for f in sorted(files)
            if _is_side_file(here / f) and (here / f).as_posix() not in exclude
        ]
        if here.parts and not kept and not dirs and _is_side_file(here / "_"):
            kept = [here]  # an empty folder a loader may expect (sentence-transformers)
        found += kept
    return found


_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
#: Room kept for what is written after the plan: the index, model card, provenance files.
_SLACK = 1 << 20


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
    :meth:`add_text` for side files. ``side_files``: a reference model directory whose
    non-weight files and folders (config, tokenizer, processor and sentence-transformers
    files; see :func:`side_files`) are carried over at the end, except those already
    written and those in ``exclude``.

    What it guarantees (README "Guarantees"):

    * ``out`` never holds a half-written model: everything goes to a staging directory
      beside it that is renamed onto ``out`` when complete;
    * before any tensor is computed, the planned size (every shard's header and data, the
      side files) is compared with the free space of ``out``'s file system: too little is an
      :class:`OutOfSpaceError`; running out anyway is the same error, and nothing is left;
    * on an exception, SIGINT, SIGTERM or SIGHUP the staging directory is removed (the
      signals become :class:`Interrupted`); staging directories of runs that died by
      SIGKILL or power loss are removed by the next run that writes the same ``out``.
    """

    def __init__(
        self,
        out: str | Path,
        infos: Sequence[TensorInfo],
        *,
        shard_size: int | str = "5GB",
        force: bool = False,
        metadata: dict[str, str] | None = None,
        side_files: str | Path | None = None,
        exclude: Sequence[str] = (),
        say: Callable[[str], None] | None = None,
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
        self.side_dir = Path(side_files) if side_files is not None else None
        self.side_files = list_side_files(self.side_dir, exclude=exclude)
        self._say = say or (lambda msg: print(msg, file=sys.stderr))
        self._tmp: Path | None = None
        self._pos = 0  # index of the next tensor expected
        self._fh: BinaryIO | None = None
        self._shard_of = {i.name: s for s, shard in enumerate(self.shards) for i in shard}
        self._guard = staging.SignalGuard()

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

    @property
    def planned_bytes(self) -> int:
        """Bytes the finished output takes: shard headers and data, side files, and slack."""
        shards = sum(
            len(_header_bytes(shard, self.metadata)) + sum(i.nbytes for i in shard)
            for shard in self.shards
        )
        sides = sum((self.side_dir / f).stat().st_size for f in self.side_files if self.side_dir)
        return shards + sides + _SLACK

    # -- context ----------------------------------------------------------------------------
    def __enter__(self) -> CheckpointWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        staging.remove_stale(self.out, self._say)
        self._check_space()
        self._guard.__enter__()
        try:
            with self._guard.hold():
                self._tmp = Path(
                    tempfile.mkdtemp(prefix=staging.staging_prefix(self.out), dir=self.out.parent)
                )
                (self._tmp / OWNER_FILE).write_text(json.dumps(staging.owner_record()) + "\n")
        except BaseException:
            self._cleanup()
            self._guard.__exit__()
            raise
        self._guard.raise_pending()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            with self._guard.hold():
                if exc_type is not None:
                    self._cleanup()
                    if isinstance(exc, KeyboardInterrupt | Interrupted):
                        self._say(
                            f"interrupted ({staging.signal_name(exc)}); nothing was written to "
                            f"{self.out} (temporary files removed)"
                        )
                    return
                try:
                    with self._space_errors("finishing"):
                        self._close()
                        self._finish()
                except BaseException:
                    self._cleanup()
                    raise
        finally:
            self._guard.__exit__()
        try:
            self._guard.raise_pending()
        except (KeyboardInterrupt, Interrupted) as e:  # arrived while finishing
            self._say(f"interrupted ({staging.signal_name(e)}) after {self.out} was complete")
            raise

    def _close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close()

    def _cleanup(self) -> None:
        with contextlib.suppress(OSError):
            self._close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("CheckpointWriter used outside its `with` block")
        return self._tmp

    # -- free space -------------------------------------------------------------------------
    def _free(self) -> int:
        return free_bytes(self.out.parent)

    def _check_space(self) -> None:
        need, free = self.planned_bytes, self._free()
        if need > free:
            raise OutOfSpaceError(
                f"{self.out}: not enough free space. The output needs {staging.human(need)} "
                f"({need:,} bytes in {len(self.shards)} shard(s) and side files); the file "
                f"system of {self.out.parent} has {staging.human(free)} ({free:,} bytes) free. "
                "Nothing was written. Choose an output path on another disk or free some space; "
                "--shard-size does not help (every shard is written before the output appears)."
            )

    @contextlib.contextmanager
    def _space_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if e.errno not in _SPACE_ERRNOS:
                raise
            raise OutOfSpaceError(
                f"{self.out}: the file system ran out of space while {what} ({e.strerror}); "
                f"the output needs {staging.human(self.planned_bytes)} and "
                f"{staging.human(self._free())} is free now (another program may be writing to "
                "the same disk). Nothing was written: the temporary directory was removed. "
                "Choose an output path on another disk or free some space."
            ) from None

    # -- tensors ----------------------------------------------------------------------------
    def _next(self, name: str) -> TensorInfo:
        """The planned info of ``name``, which must be the next tensor of the plan."""
        if self._pos >= len(self.infos) or self.infos[self._pos].name != name:
            expected = self.infos[self._pos].name if self._pos < len(self.infos) else "nothing"
            raise RuntimeError(f"writer got '{name}' but expected {expected} (plan order)")
        return self.infos[self._pos]

    def _open_shard_if_first(self, info: TensorInfo) -> None:
        s = self._shard_of[info.name]
        if info is self.shards[s][0]:
            self._close()
            self._fh = open(self.tmp / self.shard_name(s), "wb")  # noqa: SIM115 (closed in write/__exit__)
            self._fh.write(_header_bytes(self.shards[s], self.metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        info = self._next(name)
        if tuple(tensor.shape) != info.shape:
            raise BrickworkError(
                f"tensor '{name}': computed shape {tuple(tensor.shape)}, planned {info.shape}."
            )
        s = self._shard_of[name]
        data = tensor.detach().to(device="cpu", dtype=info.dtype).contiguous().reshape(-1)
        with self._space_errors(f"writing {self.shard_name(s)}"):
            self._open_shard_if_first(info)
            if data.numel():
                self._fh.write(memoryview(data.view(torch.uint8).numpy()))
        self._pos += 1

    def copy(
        self, name: str, ckpt: Checkpoint, *, source: str | None = None, chunk_bytes: int = 8 << 20
    ) -> None:
        """Write tensor ``source`` (default ``name``) of ``ckpt`` unchanged as ``name``.

        From a safetensors checkpoint whose stored dtype and shape are the planned ones, the
        bytes are copied from its file in chunks of ``chunk_bytes`` without building the
        tensor, so memory stays at one chunk however large the tensor (issue 12: the 62.5 MB
        embedding of a 0.5B Llama); the output is byte-identical to :meth:`write` of the
        tensor. Anything else (another format, a dtype conversion, a shape mismatch, which
        :meth:`write` then reports) goes through :meth:`write`.
        """
        source = name if source is None else source
        info = self._next(name)
        src = ckpt.info(source)
        if not (
            isinstance(ckpt, SafetensorsCheckpoint)
            and src.dtype == info.dtype
            and src.shape == info.shape
        ):
            self.write(name, ckpt.get(source))
            return
        s = self._shard_of[name]
        with self._space_errors(f"writing {self.shard_name(s)}"):
            self._open_shard_if_first(info)
            for piece in ckpt.iter_raw(source, chunk_bytes=chunk_bytes):
                self._fh.write(piece)
        self._pos += 1

    # -- side files ----------------------------------------------------------------------
    def add_text(self, name: str, text: str) -> None:
        with self._space_errors(f"writing {name}"):
            (self.tmp / name).write_text(text)

    def copy_from(self, directory: Path | None, *, exclude: Sequence[str] = ()) -> list[str]:
        """Copy ``directory``'s side files now (those not yet written); returns their paths."""
        if directory is None:
            return []
        return self._copy(Path(directory), list_side_files(directory, exclude=exclude))

    def _copy(self, directory: Path, files: Sequence[Path]) -> list[str]:
        copied = []
        for rel in files:
            dst = self.tmp / rel
            if dst.exists():
                continue
            with self._space_errors(f"copying {rel}"):
                if (directory / rel).is_dir():
                    dst.mkdir(parents=True)
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(directory / rel, dst)
            copied.append(rel.as_posix())
        return copied

    def _finish(self) -> None:
        if self._pos != len(self.infos):
            missing = [i.name for i in self.infos[self._pos : self._pos + 3]]
            raise RuntimeError(f"writer closed before all tensors were written (next: {missing})")
        if self.side_dir is not None:
            self._copy(self.side_dir, self.side_files)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(i.nbytes for i in self.infos)},
                "weight_map": {i.name: self.shard_name(self._shard_of[i.name]) for i in self.infos},
            }
            self.add_text("model.safetensors.index.json", json.dumps(index, indent=2))
        old = None
        if self.out.exists():
            tag = self.tmp.name.removeprefix(staging.staging_prefix(self.out))
            old = self.out.with_name(staging.old_prefix(self.out) + tag)
            self.out.rename(old)
        self.tmp.rename(self.out)
        (self.out / OWNER_FILE).unlink()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s file system."""
    return shutil.disk_usage(path).free
