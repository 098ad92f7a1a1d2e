"""Statistics on disk: a cache keyed by (model hash, data hash, kind), read tensor by tensor.

Files live under ``$BRICKWORK_CACHE/statistics/`` (default ``~/.cache/brickwork``), never
next to the user's models, as ``<model hash>-<data hash>-<kind>.safetensors`` with the
per-tensor row counts and the collection options in the safetensors metadata. They are
written atomically (a temporary file in the same folder, then ``os.replace``), so a run
that dies never leaves a half-written file that a later run would trust.

A merge reads one tensor's statistics at a time (:class:`StatisticsSource`), so its memory
holds the statistics of the tensor being merged, never all Gram matrices at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Bump when what a file holds changes meaning: old cache entries are then never read.
FORMAT = "brickwork-statistics/1"


def cache_root() -> Path:
    root = os.environ.get("BRICKWORK_CACHE") or Path.home() / ".cache" / "brickwork"
    return Path(root) / "statistics"


def _update_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def module_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of a module's class and state dict."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        _update_tensor(h, name, t)
    return h.hexdigest()[:16]


def data_hash(batches: Iterable[Any], options: Mapping[str, Any]) -> str:
    """sha256 (first 16) of every tensor of every batch, in order, and the options."""
    h = hashlib.sha256(json.dumps(dict(options), sort_keys=True, default=str).encode())
    for i, batch in enumerate(batches):
        items = (
            batch.items()
            if isinstance(batch, Mapping)
            else enumerate(batch if isinstance(batch, tuple) else (batch,))
        )
        for k, v in items:
            if isinstance(v, torch.Tensor):
                _update_tensor(h, f"{i}.{k}", v)
            else:
                h.update(f"{i}.{k}={v!r}".encode())
    return h.hexdigest()[:16]


def cache_path(model_hash: str, data_hash_: str, kind: str) -> Path:
    return cache_root() / f"{model_hash}-{data_hash_}-{kind}.safetensors"


def save_atomic(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> None:
    """Write ``tensors`` as safetensors at ``path`` via a temporary file and ``os.replace``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        meta = {"format": FORMAT, "info": json.dumps(dict(metadata), sort_keys=True)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_info(path: Path) -> dict[str, Any] | None:
    """The metadata of a cached statistics file, or ``None`` if it is absent or foreign."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a corrupt cache entry is a miss, never an error
        return None
    if meta.get("format") != FORMAT:
        return None
    return json.loads(meta.get("info", "{}"))


@dataclass(frozen=True)
class TensorStatistics:
    """What one model's calibration data says about one of its tensors.

    ``gram``: ``XᵀX`` summed over ``rows`` input rows (``(in, in)``) when the tensor is the
    weight of a linear layer; ``input_axis``: the weight's input axis (1 for ``nn.Linear``'s
    ``(out, in)``, 0 for GPT-2 ``Conv1D``'s ``(in, out)``). ``fisher``: the diagonal Fisher
    (the tensor's shape); ``fisher_norm``: its model's L2 norm over every parameter.
    """

    gram: torch.Tensor | None = None
    rows: int = 0
    input_axis: int = 1
    fisher: torch.Tensor | None = None
    fisher_norm: float | None = None
    examples: int = 0
    model: str = ""  # the model's key (path) in the recipe, for error messages

    @property
    def gram_mean(self) -> torch.Tensor:
        if self.gram is None:
            raise ValueError("no Gram matrix")
        return self.gram / max(self.rows, 1)


@dataclass
class StatisticsFile:
    """One cached file (one model, one kind), opened lazily and read a tensor at a time."""

    path: Path
    kind: str
    info: dict[str, Any]
    hit: bool = False  # read from the cache rather than computed by this run
    _names: set[str] | None = field(default=None, repr=False)

    @property
    def names(self) -> set[str]:
        if self._names is None:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as f:
                self._names = set(f.keys())
        return self._names

    def get(self, name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        if name not in self.names:
            return None
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)


@dataclass
class StatisticsSource:
    """Per-model statistics files for the executor: ``files[model key][kind]``; ``notes``
    collects what a method reports per tensor (ridges added), for the provenance."""

    files: dict[str, dict[str, StatisticsFile]]
    notes: list[dict[str, Any]] = field(default_factory=list)

    def for_tensor(self, model: str, name: str) -> TensorStatistics | None:
        kinds = self.files.get(model, {})
        out: dict[str, Any] = {}
        g = kinds.get("gram")
        if g is not None and (gram := g.get(name)) is not None:
            meta = g.info["tensors"][name]
            out |= {"gram": gram, "rows": int(meta["rows"]), "input_axis": int(meta["input_axis"])}
            out["examples"] = int(g.info.get("examples", 0))
        f = kinds.get("fisher")
        if f is not None and (fisher := f.get(name)) is not None:
            out |= {"fisher": fisher, "fisher_norm": float(f.info["norm"])}
            out["examples"] = int(f.info.get("examples", 0))
        return TensorStatistics(**out, model=model) if out else None

    def provenance(self) -> list[dict[str, Any]]:
        rows = []
        for model, kinds in self.files.items():
            for kind, f in kinds.items():
                rows.append(
                    {
                        "model": model,
                        "kind": kind,
                        "data_hash": f.info.get("data_hash"),
                        "model_hash": f.info.get("model_hash"),
                        "examples": f.info.get("examples"),
                        "rows": f.info.get("rows"),
                        "options": f.info.get("options", {}),
                        "cache_file": str(f.path),
                    }
                )
        return rows

    def ridges(self) -> list[dict[str, Any]]:
        """Regularisation added by the methods, per tensor."""
        return list(self.notes)
