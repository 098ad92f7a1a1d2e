"""Lazy checkpoint readers.

Names, shapes and dtypes come from file headers (safetensors JSON header, or the
zip index of a ``torch.save`` file read through ``torch.load(weights_only=True,
mmap=True)``); a tensor's data is read only when :meth:`Checkpoint.get` asks for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint:
    """A read-only set of named tensors. Subclasses read lazily."""

    path: Path | None = None
    label: str = "<state dict>"
    #: True for a view whose tensors differ from the files at ``path`` (B permuted by
    #: ``align:``, a base with a PEFT adapter applied): code that builds the network from
    #: ``path`` must then load the view's tensors into it (``brickwork.align.files.load_module``).
    derived: bool = False

    def __init__(self) -> None:
        self._infos: dict[str, TensorInfo] = {}

    # -- metadata (no tensor data read) -------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def infos(self) -> Iterator[TensorInfo]:
        return iter(self._infos.values())

    @property
    def num_parameters(self) -> int:
        return sum(i.numel for i in self._infos.values())

    @property
    def model_dir(self) -> Path | None:
        """Directory holding config/tokenizer files, if any."""
        if self.path is None:
            return None
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def config(self) -> dict[str, Any] | None:
        d = self.model_dir
        if d is None or not (d / "config.json").is_file():
            return None
        try:
            return json.loads((d / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{d / 'config.json'}: not valid JSON ({e}).") from None

    # -- data ----------------------------------------------------------------------------
    def get(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``. ``buffer``: a uint8 tensor of at least the tensor's bytes that
        a file reader may read into instead of fresh memory (the result is then a view of it:
        convert or copy it before reusing the buffer); in-memory checkpoints ignore it."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        return []

    def checksum(self) -> str:
        """sha256 of the weight file (of the shards' digests when sharded), first 16 hex digits.

        Digests are cached by (path, size, mtime) like git's index, so merging the same
        inputs again does not re-read them; state dicts get a digest of their metadata.
        """
        files = self.files()
        if not files:
            h = hashlib.sha256()
            for i in self._infos.values():
                h.update(f"{i.name}{i.shape}{i.dtype}".encode())
            return "meta:" + h.hexdigest()[:16]
        digests = [file_sha256(f) for f in files]
        if len(digests) == 1:
            return digests[0][:16]
        return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


_HASH_LOCK = threading.Lock()


def _hash_cache_path() -> Path:
    root = os.environ.get("BRICKWORK_CACHE") or Path.home() / ".cache" / "brickwork"
    return Path(root) / "sha256-cache.json"


def file_sha256(f: Path) -> str:
    """Full sha256 hex digest of ``f``, cached by resolved path, size and mtime."""
    st = f.stat()
    key = str(f.resolve())
    stamp = [st.st_size, st.st_mtime_ns]
    cache_file = _hash_cache_path()
    with _HASH_LOCK:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        hit = cache.get(key)
        if isinstance(hit, dict) and hit.get("stamp") == stamp:
            return str(hit["sha256"])
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    with _HASH_LOCK:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        cache[key] = {"stamp": stamp, "sha256": digest}
        try:  # best effort: a read-only home must not fail a merge
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            tmp.replace(cache_file)
        except OSError:
            pass
    return digest


class StateDictCheckpoint(Checkpoint):
    """An in-memory state dict (or an ``nn.Module``'s) seen through the Checkpoint API."""

    def __init__(self, state: Mapping[str, torch.Tensor], *, label: str = "<state dict>") -> None:
        super().__init__()
        self.label = label
        self._state = dict(state)
        for k, t in self._state.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(
                    f"{label}: entry '{k}' is a {type(t).__name__}, expected a torch.Tensor."
                )
            self._infos[k] = TensorInfo(k, tuple(t.shape), t.dtype)

    def get(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self._state[name]


def _read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header without reading tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: file is {size} bytes, too short to be safetensors "
                    "(truncated download or copy?). Re-create or re-download it."
                )
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header claims {n} bytes but the file has {size}: not a valid "
                    "safetensors file, or truncated. Re-create or re-download it."
                )
            header = json.loads(fh.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(
            f"{path}: safetensors header is not valid JSON (corrupt file)."
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object (corrupt file).")
    data_len = size - 8 - n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            begin, end = v["data_offsets"]
            dtype = v["dtype"]
            _ = list(v["shape"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor '{k}' has a malformed header entry.") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor '{k}' has unsupported dtype {dtype}.")
        if end > data_len:
            raise CheckpointError(
                f"{path}: tensor '{k}' ends at byte {end} of the data section but the file holds "
                f"only {data_len}: the file is truncated. Re-create or re-download it."
            )
    return header, n


class SafetensorsCheckpoint(Checkpoint):
    """One ``.safetensors`` file, a directory with one, or a sharded directory with an index."""

    def __init__(self, path: Path, files: list[Path]) -> None:
        super().__init__()
        self.path = path
        self.label = str(path)
        self._files = files
        self._where: dict[str, Path] = {}
        self._span: dict[str, tuple[int, int]] = {}  # name -> (file offset, bytes)
        self._handles: dict[Path, BinaryIO] = {}
        self._lock = threading.Lock()
        for f in files:
            header, n = _read_safetensors_header(f)
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if k in self._where:
                    raise CheckpointError(f"{path}: tensor '{k}' appears in two shards.")
                self._where[k] = f
                self._infos[k] = TensorInfo(k, tuple(v["shape"]), SAFETENSORS_DTYPES[v["dtype"]])
                begin, end = v["data_offsets"]
                if end - begin != self._infos[k].nbytes:
                    raise CheckpointError(
                        f"{f}: tensor '{k}' spans {end - begin} bytes, its shape and dtype "
                        f"need {self._infos[k].nbytes} (corrupt file)."
                    )
                self._span[k] = (8 + n + begin, end - begin)

    def files(self) -> list[Path]:
        return list(self._files)

    def get(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into fresh memory (or into ``buffer``) with plain file reads.

        Not memory-mapped on purpose: pages of a mapping stay in the process's resident
        set until it is unmapped, so a merge that mapped its inputs would show their whole
        size as RSS; reading also avoids one page fault per 4 KiB (and none at all into a
        reused ``buffer``).
        """
        f = self._where[name]
        info = self._infos[name]
        offset, nbytes = self._span[name]
        if buffer is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)  # (bytes,)
        else:
            buf = buffer.reshape(-1)[:nbytes]
        view = memoryview(buf.numpy())
        with self._lock:
            fh = self._handles.get(f)
            if fh is None:
                try:
                    fh = self._handles[f] = open(f, "rb", buffering=0)  # noqa: SIM115
                except OSError as e:
                    raise CheckpointError(f"{f}: cannot read ({e.strerror}).") from None
            fh.seek(offset)
            got = 0
            while got < nbytes:
                n = fh.readinto(view[got:])
                if not n:
                    raise CheckpointError(
                        f"{f}: ended while reading tensor '{name}' (truncated since it was opened?)."
                    )
                got += n
        return buf.view(info.dtype).reshape(info.shape)

    def raw_range(self, name: str) -> tuple[Path, int, int]:
        """Where tensor ``name``'s bytes lie: ``(file, byte offset, number of bytes)``."""
        offset, nbytes = self._span[name]
        return self._where[name], offset, nbytes

    def iter_raw(self, name: str, *, chunk_bytes: int = 8 << 20) -> Iterator[memoryview]:
        """Tensor ``name``'s stored bytes (C order, little-endian, as safetensors holds them)
        in pieces of at most ``chunk_bytes``, read into one reused buffer: each piece is
        valid only until the next is asked for. Memory stays at one chunk, whatever the
        tensor's size (a chunked pass-through copy, see ``CheckpointWriter.copy``)."""
        f, offset, nbytes = self.raw_range(name)
        buf = memoryview(bytearray(min(max(chunk_bytes, 1), max(nbytes, 1))))
        try:
            fh = open(f, "rb", buffering=0)  # noqa: SIM115 (closed below; a generator)
        except OSError as e:
            raise CheckpointError(f"{f}: cannot read ({e.strerror}).") from None
        with fh:
            fh.seek(offset)
            left = nbytes
            while left:
                n = fh.readinto(buf[: min(left, len(buf))])
                if not n:
                    raise CheckpointError(
                        f"{f}: ended while reading tensor '{name}' (truncated since it was opened?)."
                    )
                left -= n
                yield buf[:n]


class TorchCheckpoint(Checkpoint):
    """``pytorch_model.bin`` / ``.pt`` files, read only with ``torch.load(weights_only=True)``."""

    def __init__(self, path: Path, files: list[Path]) -> None:
        super().__init__()
        self.path = path
        self.label = str(path)
        self._files = files
        self._state: dict[str, torch.Tensor] = {}
        for f in files:
            sd = _safe_torch_load(f)
            for k, t in sd.items():
                self._state[k] = t
                self._infos[k] = TensorInfo(k, tuple(t.shape), t.dtype)

    def files(self) -> list[Path]:
        return list(self._files)

    def get(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self._state[name]


def _first_line(e: BaseException) -> str:
    lines = str(e).splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def _safe_torch_load(f: Path) -> dict[str, torch.Tensor]:
    import pickle
    import zipfile

    try:
        mmap = zipfile.is_zipfile(f)
        with warnings.catch_warnings():  # torch warns about pickle protocols; our errors say more
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            obj = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower() and "unsupported global" not in str(e).lower():
            raise CheckpointError(
                f"{f}: cannot read as a PyTorch checkpoint ({_first_line(e)}); "
                "the file may be truncated or corrupt."
            ) from None
        raise CheckpointError(
            f"{f}: refused to load: the pickle holds objects other than tensors "
            f"({_first_line(e)}). brickwork only loads tensors "
            "(torch.load weights_only=True) because unpickling can run code. "
            "Convert the file to safetensors in an environment you trust."
        ) from None
    except Exception as e:  # torch raises KeyError, RuntimeError, ... on corrupt bytes
        raise CheckpointError(
            f"{f}: cannot read as a PyTorch checkpoint ({_first_line(e)}); "
            "the file may be truncated or corrupt."
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{f}: expected a dict of tensors (a state dict), found {type(obj).__name__}."
        )
    return obj


def _index_files(index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text())
        names = sorted(set(data["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e}).") from None
    files = [index.parent / n for n in names]
    for f in files:
        if not f.is_file():
            raise CheckpointError(
                f"{index}: lists shard '{f.name}', which does not exist in {index.parent}."
            )
    return files


def open_checkpoint(
    source: str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module | Checkpoint,
) -> Checkpoint:
    """Open a checkpoint lazily from a path, a state dict or an ``nn.Module``."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, torch.nn.Module):
        return StateDictCheckpoint(source.state_dict(), label=f"<{type(source).__name__}>")
    if isinstance(source, Mapping):
        return StateDictCheckpoint(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such file or directory. Check the model path in the recipe."
        )
    if path.is_dir():
        for name in WEIGHT_FILES:
            f = path / name
            if not f.is_file():
                continue
            if name.endswith(".index.json"):
                files = _index_files(f)
            else:
                files = [f]
            cls = SafetensorsCheckpoint if "safetensors" in name else TorchCheckpoint
            return cls(path, files)
        st = sorted(path.glob("*.safetensors"))
        if st:
            return SafetensorsCheckpoint(path, st)
        pt = sorted([*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
        if len(pt) == 1:
            return TorchCheckpoint(path, pt)
        raise CheckpointError(
            f"{path}: no weights found (expected model.safetensors, a sharded "
            "model.safetensors.index.json, or pytorch_model.bin)."
        )
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint(path, [path])
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return TorchCheckpoint(path, [path])
    if path.name.endswith(".index.json"):
        files = _index_files(path)
        cls = SafetensorsCheckpoint if "safetensors" in path.name else TorchCheckpoint
        return cls(path.parent, files)
    raise CheckpointError(
        f"{path}: unknown checkpoint format '{path.suffix}' (expected .safetensors, .bin, .pt, or a model directory)."
    )
