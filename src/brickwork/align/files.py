"""Alignment of model *files*: ``brickwork align A B OUT`` and a merge recipe's ``align:``.

Model directories are Hugging Face checkpoints (``config.json`` + weights). Their permutation
spec comes from the config and the tensor names (:func:`brickwork.align.hf_spec.
hf_permutation_spec`), so no network is built for weight matching: the spec's tensors are read
from the files, matched, and B's tensors are written permuted, one at a time, through the
shared writer (atomic, never over an input). Activation matching builds both networks and runs
the calibration data through them.

:class:`PermutedCheckpoint` is B seen through its permutations: a lazy, read-only checkpoint
whose ``get`` returns each tensor permuted, so a merge recipe's ``align:`` feeds aligned models
to any merge method without writing them first.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brickwork.align.spec import PermutationSpec, permute_tensor
from brickwork.checkpoint.reader import Checkpoint, open_checkpoint
from brickwork.errors import AlignError, unknown_name

FILE_METHODS = ("weight", "activation")


@dataclass
class AlignOptions:
    method: str = "weight"
    heads: bool = True
    within_head: bool = True
    residual: bool = False
    seed: int = 0
    max_iter: int = 100

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class AlignResult:
    spec: PermutationSpec
    perms: dict[str, torch.Tensor]
    options: AlignOptions
    objective: list[float] = field(default_factory=list)  # weight matching: per pass
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        moved = sum(int((p != torch.arange(len(p))).sum()) for p in self.perms.values())
        units = sum(len(p) for p in self.perms.values())
        out = {
            **self.options.as_dict(),
            "groups": len(self.spec.groups),
            "units": units,
            "units_moved": moved,
            "seconds": round(self.seconds, 3),
        }
        if self.objective:
            out["objective_before"] = self.objective[0]
            out["objective_after"] = self.objective[-1]
            out["passes"] = len(self.objective) - 1
        return out


class PermutedCheckpoint(Checkpoint):
    """``inner`` with every tensor of ``spec`` permuted by ``perms`` (read lazily)."""

    def __init__(
        self, inner: Checkpoint, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
    ) -> None:
        super().__init__()
        self.inner = inner
        self.spec = spec
        self.perms = dict(perms)
        self._moves = spec.members_of()
        self._infos = dict(inner._infos)
        self.path = inner.path
        self.label = f"{inner.label} (aligned)"

    def get(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        tensor = self.inner.get(name, buffer=buffer)
        if name not in self._moves:
            return tensor
        return permute_tensor(tensor, self._moves[name], self.perms)

    def files(self) -> list[Path]:
        return self.inner.files()

    def checksum(self) -> str:
        """The file's digest and the permutations' (statistics cached for the file are not
        those of the permuted model)."""
        return f"{self.inner.checksum()}+perm:{_perm_digest(self.perms)}"

    def permuted_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """A module's state dict (e.g. of the network built from ``inner``'s files) with the
        permutations applied; names not in the spec are returned unchanged."""
        return {
            k: permute_tensor(v, self._moves[k], self.perms) if k in self._moves else v
            for k, v in state_dict.items()
        }


def load_module(ck: Checkpoint, where: str) -> nn.Module:
    """The Hugging Face network of ``ck``'s directory, with ``ck``'s permutations applied when
    it is a :class:`PermutedCheckpoint` (so data-aware merges run the aligned model)."""
    from brickwork.stats.data import load_hf_module

    inner = ck.inner if isinstance(ck, PermutedCheckpoint) else ck
    if inner.path is None:
        raise AlignError(f"{where}: an in-memory state dict cannot be run on data.")
    module = load_hf_module(inner.path, where)
    if isinstance(ck, PermutedCheckpoint):
        module.load_state_dict(ck.permuted_state_dict(module.state_dict()), strict=True)
    return module


def checkpoint_spec(ck: Checkpoint, where: str, options: AlignOptions) -> PermutationSpec:
    """The permutation spec of a Hugging Face model directory, from its config and names."""
    cfg = ck.config
    if cfg is None:
        raise AlignError(
            f"{where}: {ck.label} has no config.json, so brickwork cannot tell which of its "
            "tensors form FFNs, heads and the residual stream. Give a Hugging Face model "
            "directory (config.json + weights); for your own PyTorch modules call "
            "brickwork.align(model_a, model_b) in Python, which traces the module."
        )
    from brickwork.align.hf_spec import hf_permutation_spec

    return hf_permutation_spec(
        cfg,
        ck.names,
        heads=options.heads,
        within_head=options.within_head,
        residual=options.residual,
    )


def _check_same(a: Checkpoint, b: Checkpoint, label_a: str, label_b: str) -> None:
    ta = {n: a.info(n).shape for n in a.names}
    tb = {n: b.info(n).shape for n in b.names}
    if ta == tb:
        return
    diff = sorted(n for n in ta.keys() | tb.keys() if ta.get(n) != tb.get(n))
    shown = ", ".join(f"{n} ({ta.get(n, 'absent')} vs {tb.get(n, 'absent')})" for n in diff[:4])
    raise AlignError(
        f"{label_a} and {label_b} are not the same architecture: {len(diff)} tensor(s) differ "
        f"in name or shape, e.g. {shown}. Alignment permutes units of one architecture; "
        "give two models with the same config."
    )


def _spec_tensors(ck: Checkpoint, spec: PermutationSpec) -> dict[str, torch.Tensor]:
    return {name: ck.get(name).to(torch.float32) for name in spec.members_of()}


def align_checkpoints(
    a: Checkpoint,
    b: Checkpoint,
    options: AlignOptions,
    *,
    data: Any = None,
    labels: tuple[str, str] = ("model A", "model B"),
    recipe_dir: Path | None = None,
) -> AlignResult:
    """Permutations of ``b``'s units onto ``a``'s (weight or activation matching)."""
    if options.method not in FILE_METHODS:
        raise unknown_name("alignment method for model files", options.method, FILE_METHODS)
    t0 = time.perf_counter()
    spec = checkpoint_spec(a, labels[0], options)
    checkpoint_spec(b, labels[1], options)  # B must be a model directory of its own too
    _check_same(a, b, *labels)
    objective: list[float] = []
    if options.method == "weight":
        from brickwork.align.weight_matching import weight_matching

        res = weight_matching(
            spec,
            _spec_tensors(a, spec),
            _spec_tensors(b, spec),
            seed=options.seed,
            max_iter=options.max_iter,
        )
        perms, objective = res.perms, res.objective
    else:
        if data is None:
            raise AlignError(
                "activation matching needs calibration data: pass --data FILE (text, .jsonl "
                "or .safetensors of input_ids), or use --method weight, which needs none."
            )
        from brickwork.align.api import align as align_modules
        from brickwork.stats.data import load_batches

        model_a, model_b = load_module(a, labels[0]), load_module(b, labels[1])
        vocab = getattr(model_b.config, "vocab_size", None)
        batches = load_batches(
            data, model_dir=b.model_dir, vocab_size=vocab, where=labels[1], recipe_dir=recipe_dir
        )
        _, perms = align_modules(
            model_a,
            model_b,
            method="activation",
            data=batches,
            heads=options.heads,
            within_head=options.within_head,
            residual=options.residual,
        )
    return AlignResult(spec, perms, options, objective, time.perf_counter() - t0)


def _perm_digest(perms: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(perms):
        h.update(k.encode())
        h.update(perms[k].to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def align_files(
    model_a: str | Path,
    model_b: str | Path,
    out: str | Path,
    *,
    options: AlignOptions | None = None,
    data: Any = None,
    force: bool = False,
    shard_size: str = "5GB",
    progress: bool = True,
) -> tuple[Path, AlignResult]:
    """Write B with its units permuted onto A's as a model directory at ``out``.

    The output has B's config, tokenizer and dtypes and computes B's function (it loads
    wherever B did); ``brickwork.json`` records the inputs, the options and the objective,
    ``brickwork_permutations.json`` the permutation of every group (new unit ``i`` is B's unit
    ``perm[i]``)."""
    from brickwork.checkpoint.provenance import environment
    from brickwork.checkpoint.writer import CheckpointWriter
    from brickwork.merge.api import check_output_is_not_input

    options = options or AlignOptions()
    out = Path(out)
    ck_a, ck_b = open_checkpoint(model_a), open_checkpoint(model_b)
    check_output_is_not_input(out, {"A": ck_a, "B": ck_b})
    if out.exists() and not force:
        from brickwork.errors import OutputExistsError

        raise OutputExistsError(
            f"{out}: already exists. Choose another output path or pass --force to replace it."
        )
    result = align_checkpoints(
        ck_a, ck_b, options, data=data, labels=(f"model A ({model_a})", f"model B ({model_b})")
    )
    view = PermutedCheckpoint(ck_b, result.spec, result.perms)
    infos = list(ck_b.infos())
    with CheckpointWriter(
        out, infos, shard_size=shard_size, force=force, side_files=ck_b.model_dir
    ) as writer:
        bar = _bar(len(infos), progress)
        for info in infos:
            writer.write(info.name, view.get(info.name).contiguous())
            bar.update(1)
        bar.close()
        record = {
            "kind": "align",
            "inputs": {"A": ck_a.checksum(), "B": ck_b.checksum()},
            "paths": {"A": str(model_a), "B": str(model_b)},
            "alignment": result.summary(),
            "permutations_sha256": _perm_digest(result.perms),
            "environment": environment(),
        }
        writer.add_text("brickwork.json", json.dumps(record, indent=2, default=str) + "\n")
        perms = {k: v.tolist() for k, v in result.perms.items()}
        writer.add_text("brickwork_permutations.json", json.dumps(perms) + "\n")
    return out, result


def _bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="write aligned B", unit="tensor", disable=not enabled)


def align_recipe_models(
    recipe: Any,
    ckpts: dict[str, Checkpoint],
    *,
    recipe_dir: Path | None = None,
    open_path: Any = None,
) -> tuple[dict[str, Checkpoint], dict[str, Any]]:
    """A merge recipe's ``align:`` block: every checkpoint except ``align.to`` replaced by a
    :class:`PermutedCheckpoint` aligned onto it. ``align.to`` is one of the recipe's models
    (or its base), or another model directory, opened with ``open_path``. Returns the new
    checkpoints and a summary for ``brickwork.json``."""
    spec = recipe.align
    options = AlignOptions(
        method=spec.method,
        heads=spec.heads,
        within_head=spec.within_head,
        residual=spec.residual,
        seed=spec.seed,
        max_iter=spec.max_iter,
    )
    target_key = _target_key(spec.to, ckpts, recipe_dir)
    target = ckpts[target_key] if target_key is not None else open_path(spec.to)
    out = dict(ckpts)
    summary: dict[str, Any] = {"to": spec.to, "models": {}}
    for key, ck in ckpts.items():
        if key == target_key:
            continue
        result = align_checkpoints(
            target,
            ck,
            options,
            data=spec.data,
            labels=(f"align.to ({spec.to})", f"model '{key}'"),
            recipe_dir=recipe_dir,
        )
        out[key] = PermutedCheckpoint(ck, result.spec, result.perms)
        summary["models"][key] = {
            **result.summary(),
            "permutations_sha256": _perm_digest(result.perms),
        }
    return out, summary


def _target_key(to: str, ckpts: Mapping[str, Checkpoint], recipe_dir: Path | None) -> str | None:
    if to in ckpts:
        return to
    candidates = [Path(to).expanduser()]
    if recipe_dir is not None:
        candidates.append(recipe_dir / to)
    wanted = {c.resolve() for c in candidates if c.exists()}
    for key, ck in ckpts.items():
        if ck.path is not None and ck.path.resolve() in wanted:
            return key
    return None
