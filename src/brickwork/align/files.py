"""Alignment of model *files*: ``brickwork align A B OUT`` and a merge recipe's ``align:``.

Model directories are Hugging Face checkpoints (``config.json`` + weights). Their permutation
spec comes from the config and the tensor names (:func:`brickwork.align.hf_spec.
hf_permutation_spec`), so no network is built for weight matching: the spec's tensors are read
from the files, matched, and B's tensors are written permuted, one at a time, through the
shared writer (atomic, never over an input). Without the residual stream weight matching reads
one independent part of the spec (a layer's FFN, its heads) at a time
(:func:`~brickwork.align.streamed.weight_matching_streamed`), so memory stays near one layer.
Activation matching builds both networks and runs the calibration data through them.

``method="ot"`` transports B onto A's units (Singh & Jaggi 2020,
:mod:`brickwork.align.ot_fusion`): FFN units and heads as whole blocks (no within-head
groups), the stream with ``residual``; exact EMD gives permutations (B's function, as above),
Sinkhorn a soft map (B' then only approximates B). B may have other FFN widths than A: it is
transported into A's widths and the output takes A's ``config.json`` (B's other side files).
``method="zip"`` (needs data) is ZipIt! (Stoica et al. 2024, :func:`~brickwork.align.zipit.
zip_transformers`): a *merge* of A and B, not B aligned, written with A's config and side
files; its provenance records the calibration loss of A, B, their plain average and the zip.

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
from brickwork.errors import AlignError, DataError, unknown_name

FILE_METHODS = ("weight", "activation", "ot", "zip")
_DATA_METHODS = ("activation", "zip")  # need --data; "ot" may use it


@dataclass
class AlignOptions:
    method: str = "weight"
    heads: bool = True
    within_head: bool = True
    residual: bool = False
    seed: int = 0
    max_iter: int = 100
    solver: str = "emd"  # ot
    reg: float = 0.01  # ot, sinkhorn
    alpha: float = 0.5  # zip
    beta: float = 0.5  # zip

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        if self.method != "ot":
            del out["solver"], out["reg"]
        elif self.solver == "emd":
            del out["reg"]
        if self.method != "zip":
            del out["alpha"], out["beta"]
        if self.method in ("ot", "zip"):
            out["within_head"] = False  # nested groups are not transported / zipped
            del out["seed"], out["max_iter"]
        return out


@dataclass
class AlignResult:
    spec: PermutationSpec
    perms: dict[str, torch.Tensor]
    options: AlignOptions
    objective: list[float] = field(default_factory=list)  # weight matching: per pass
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # ot / zip: what the summary adds

    def summary(self) -> dict[str, Any]:
        out = {**self.options.as_dict(), "groups": len(self.spec.groups)}
        if self.perms or self.options.method in ("weight", "activation"):
            moved = sum(int((p != torch.arange(len(p))).sum()) for p in self.perms.values())
            out["units"] = sum(len(p) for p in self.perms.values())
            out["units_moved"] = moved
        out["seconds"] = round(self.seconds, 3)
        if self.objective:
            out["objective_before"] = self.objective[0]
            out["objective_after"] = self.objective[-1]
            out["passes"] = len(self.objective) - 1
        out.update(self.extra)
        return out


class PermutedCheckpoint(Checkpoint):
    """``inner`` with every tensor of ``spec`` permuted by ``perms`` (read lazily)."""

    derived = True

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


def load_module(ck: Checkpoint, where: str) -> nn.Module:
    """The Hugging Face network of ``ck``'s directory. For a derived view (``ck.derived``: a
    :class:`PermutedCheckpoint`, a base with a PEFT adapter applied, or one inside the other)
    the network is built from the files and then given the view's tensors, so data-aware
    merges and activation matching run the model the recipe means. Tensors the view does not
    hold (a tied LM head absent from the file) keep the files' values, shared as before."""
    from brickwork.stats.data import load_hf_module

    if ck.path is None:
        raise AlignError(f"{where}: an in-memory state dict cannot be run on data.")
    module = load_hf_module(ck.path, where)
    if ck.derived:
        current = module.state_dict()
        given = [k for k in current if k in ck]
        if not given:
            raise AlignError(
                f"{where}: none of the network's tensors (e.g. '{next(iter(current), '')}') is "
                f"in {ck.label} (e.g. '{ck.names[0] if ck.names else ''}'), so its weights "
                "cannot be loaded into the network transformers builds from its config."
            )
        tensors = {k: ck.get(k).to(current[k].dtype) for k in given}
        module.load_state_dict(tensors, strict=False)
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
    if options.method in ("ot", "zip"):
        raise AlignError(
            f"method '{options.method}' does not give permutations; use align_files (brickwork "
            "align A B OUT --method ot|zip), or weight / activation in a merge recipe's align:."
        )
    if options.method == "weight":
        res = _weight_matching(spec, a, b, options)
        perms, objective = res.perms, res.objective
    else:
        if data is None:
            raise DataError(
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


def _weight_matching(spec: PermutationSpec, a: Checkpoint, b: Checkpoint, options: AlignOptions):
    """Weight matching read one component at a time when the spec has no residual stream
    (its components are then per layer, so memory stays near one layer of each model); with
    the stream every layer is one component and the whole spec is read at once."""
    if not any(g.name == "residual" for g in spec.groups):
        from brickwork.align.streamed import weight_matching_streamed

        return weight_matching_streamed(spec, a, b, seed=options.seed, max_iter=options.max_iter)
    from brickwork.align.weight_matching import weight_matching

    return weight_matching(
        spec,
        _spec_tensors(a, spec),
        _spec_tensors(b, spec),
        seed=options.seed,
        max_iter=options.max_iter,
    )


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
    ``perm[i]``).

    ``method="ot"``: B transported onto A (A's widths and, when they differ, A's config.json;
    B's dtypes and other side files); ``brickwork_transport.json`` summarises each group's
    plan (its shape, the permutation when it is one). EMD with equal widths computes B's
    function; Sinkhorn (``solver="sinkhorn"``, ``reg``) is a soft map that only approximates
    it. ``method="zip"``: the ZipIt merge of A and B (needs ``data``), with A's config, side
    files and dtypes; ``brickwork.json`` records the calibration losses."""
    from brickwork.checkpoint.provenance import environment
    from brickwork.checkpoint.writer import CheckpointWriter
    from brickwork.merge.api import check_output_is_not_input

    options = options or AlignOptions()
    if options.method not in FILE_METHODS:
        raise unknown_name("alignment method for model files", options.method, FILE_METHODS)
    out = Path(out)
    ck_a, ck_b = open_checkpoint(model_a), open_checkpoint(model_b)
    check_output_is_not_input(out, {"A": ck_a, "B": ck_b})
    if out.exists() and not force:
        from brickwork.errors import OutputExistsError

        raise OutputExistsError(
            f"{out}: already exists. Choose another output path or pass --force to replace it."
        )
    labels = (f"model A ({model_a})", f"model B ({model_b})")
    config_text = None  # a config.json that replaces the side files' one
    side = ck_b.model_dir
    tables: dict[str, Any] = {}
    if options.method == "ot":
        result, get, infos, config_text, tables = _transport_files(
            ck_a, ck_b, options, data, labels
        )
    elif options.method == "zip":
        result, get, infos = _zip_files(ck_a, ck_b, options, data, labels)
        side = ck_a.model_dir
    else:
        result = align_checkpoints(ck_a, ck_b, options, data=data, labels=labels)
        get = PermutedCheckpoint(ck_b, result.spec, result.perms).get
        infos = list(ck_b.infos())
    with CheckpointWriter(
        out, infos, shard_size=shard_size, force=force, side_files=side
    ) as writer:
        if config_text is not None:
            writer.add_text("config.json", config_text)
        bar = _bar(len(infos), progress, options.method)
        for info in infos:
            writer.write(info.name, get(info.name).contiguous())
            bar.update(1)
        bar.close()
        record = {
            "kind": "align" if options.method != "zip" else "zip",
            "inputs": {"A": ck_a.checksum(), "B": ck_b.checksum()},
            "paths": {"A": str(model_a), "B": str(model_b)},
            "alignment": result.summary(),
            "environment": environment(),
        }
        if result.perms:
            record["permutations_sha256"] = _perm_digest(result.perms)
        writer.add_text("brickwork.json", json.dumps(record, indent=2, default=str) + "\n")
        if options.method in ("weight", "activation"):
            perms = {k: v.tolist() for k, v in result.perms.items()}
            writer.add_text("brickwork_permutations.json", json.dumps(perms) + "\n")
        if tables:
            writer.add_text("brickwork_transport.json", json.dumps(tables) + "\n")
    return out, result


def _require_config(ck: Checkpoint, where: str) -> None:
    if ck.config is None:
        checkpoint_spec(ck, where, AlignOptions())  # raises the no-config.json error


def _transport_files(
    a: Checkpoint, b: Checkpoint, options: AlignOptions, data: Any, labels: tuple[str, str]
) -> tuple[AlignResult, Any, list, str | None, dict[str, Any]]:
    """OT of B's units onto A's: the result, a per-tensor getter of transported B, the output
    tensor plan (A's shapes, B's dtypes), A's config.json text when the widths differ, and the
    per-group summary of the plans (``brickwork_transport.json``)."""
    from brickwork.align.ot_fusion import (
        _activation_costs,
        check_compatible,
        fusion_spec,
        hf_fusion_spec,
        plan_is_permutation,
        transport_maps_of_states,
        transport_state_dict,
    )
    from brickwork.checkpoint.reader import TensorInfo

    t0 = time.perf_counter()
    for ck, where in zip((a, b), labels):
        _require_config(ck, where)
    kw = {"residual": options.residual, "heads": options.heads}
    spec_a, spec_b = (
        hf_fusion_spec(a.config, a.names, **kw),
        hf_fusion_spec(b.config, b.names, **kw),
    )
    meta_a = {n: torch.empty(a.info(n).shape, device="meta") for n in a.names}
    meta_b = {n: torch.empty(b.info(n).shape, device="meta") for n in b.names}
    try:
        check_compatible(spec_a, spec_b, meta_a, meta_b)
    except AlignError as e:
        raise AlignError(f"{labels[0]} and {labels[1]}: {e}") from None
    costs = None
    sd_a, sd_b = meta_a, meta_b
    if data is not None:
        from brickwork.stats.data import load_batches

        model_a, model_b = load_module(a, labels[0]), load_module(b, labels[1])
        vocab = getattr(model_b.config, "vocab_size", None)
        batches = load_batches(data, model_dir=b.model_dir, vocab_size=vocab, where=labels[1])
        costs = _activation_costs(
            fusion_spec(model_a, **kw), fusion_spec(model_b, **kw), model_a, model_b, batches
        )
        del model_a, model_b
        maps = transport_maps_of_states(
            spec_a, spec_b, sd_a, sd_b, costs=costs, solver=options.solver, reg=options.reg
        )
    else:
        maps = _weight_transport(a, b, spec_a, spec_b, options)
    perms, tables = {}, {}
    for name, plan in maps.plan.items():
        perm = plan_is_permutation(plan)
        if perm is not None:
            perms[name] = perm
        tables[name] = {
            "shape": list(plan.shape),  # (B's units, A's units)
            "permutation": None if perm is None else perm.tolist(),
            # how much of each B unit's mass goes to its largest A unit (1: no splitting)
            "mean_top_share": round(float((plan.max(1).values / plan.sum(1)).mean()), 6),
        }
    moves_b = spec_b.members_of()

    def get(name: str) -> torch.Tensor:
        tensor = b.get(name)
        if name not in moves_b:
            return tensor
        return transport_state_dict({name: tensor}, spec_b, maps)[name]

    infos = [TensorInfo(n, a.info(n).shape, b.info(n).dtype) for n in b.names]
    widened = any(a.info(n).shape != b.info(n).shape for n in b.names)
    config_text = (a.model_dir / "config.json").read_text() if widened else None
    exact = len(perms) == len(maps.plan)
    extra = {
        "plans_that_are_permutations": f"{len(perms)} of {len(maps.plan)}",
        "computes_b_exactly": exact,
        "config": "A" if widened else "B",
        "cost": "activation" if costs is not None else "weight",
    }
    result = AlignResult(spec_b, perms, options, seconds=time.perf_counter() - t0, extra=extra)
    return result, get, infos, config_text, tables


def _weight_transport(
    a: Checkpoint, b: Checkpoint, spec_a: PermutationSpec, spec_b: PermutationSpec, options
):
    """Weight-cost transport maps, one independent component of the spec at a time (per
    layer without the residual stream; the whole spec with it): only that component's
    tensors are read, so memory stays near one layer of each model."""
    from brickwork.align.ot_fusion import TransportMaps, transport_maps_of_states
    from brickwork.align.streamed import _release_memory, components

    maps = TransportMaps({}, {}, {})
    for part_a in components(spec_a):
        part_b = PermutationSpec(tuple(spec_b[g.name] for g in part_a.groups))
        sd_a, sd_b = _spec_tensors(a, part_a), _spec_tensors(b, part_b)
        got = transport_maps_of_states(
            part_a, part_b, sd_a, sd_b, solver=options.solver, reg=options.reg
        )
        for table in ("plan", "out", "inp"):
            getattr(maps, table).update(getattr(got, table))
        del sd_a, sd_b
        _release_memory()
    return maps


def _zip_files(
    a: Checkpoint, b: Checkpoint, options: AlignOptions, data: Any, labels: tuple[str, str]
) -> tuple[AlignResult, Any, list]:
    """ZipIt of A and B (transformers): the result (with the calibration losses), a getter of
    the zipped tensors and A's tensor plan."""
    import copy

    from brickwork.align.zipit import zip_transformers
    from brickwork.stats.data import load_batches

    t0 = time.perf_counter()
    if data is None:
        raise AlignError(
            "--method zip needs calibration data: pass --data FILE (text, .jsonl or "
            ".safetensors of input_ids); ZipIt matches features by their correlations on it."
        )
    for ck, where in zip((a, b), labels):
        _require_config(ck, where)
    _check_same(a, b, *labels)
    model_a, model_b = load_module(a, labels[0]), load_module(b, labels[1])
    vocab = getattr(model_a.config, "vocab_size", None)
    batches = load_batches(data, model_dir=a.model_dir, vocab_size=vocab, where=labels[0])
    zipped, merges = zip_transformers(
        [model_a, model_b], batches, alpha=options.alpha, beta=options.beta, heads=options.heads
    )
    average = copy.deepcopy(model_a)
    sd_b = model_b.state_dict()
    average.load_state_dict(
        {
            k: (v + sd_b[k]) / 2 if v.is_floating_point() else v
            for k, v in model_a.state_dict().items()
        }
    )
    models = {"A": model_a, "B": model_b, "average": average, "zipped": zipped}
    quality = _calibration_losses(models, batches)
    state = zipped.state_dict()
    missing = [n for n in a.names if n not in state]
    if missing:
        raise AlignError(
            f"{labels[0]}: tensor(s) {', '.join(missing[:5])} of the files are not in the "
            "network transformers builds from its config; cannot write the zipped model."
        )
    infos = list(a.infos())
    from brickwork.align.ot_fusion import hf_fusion_spec

    keys = model_a.state_dict().keys()
    spec = hf_fusion_spec(
        model_a.config, keys, residual=True, heads=options.heads, output_stream=True
    )
    extra = {
        "calibration_loss": quality,
        "merged_units": {k: list(m.shape) for k, m in merges.items()},
    }
    result = AlignResult(spec, {}, options, seconds=time.perf_counter() - t0, extra=extra)
    return result, lambda name: state[name], infos


def _calibration_losses(models: dict[str, nn.Module], batches: list) -> dict[str, Any]:
    """Mean next-token loss of each language model on the calibration batches (padding
    masked); ``None`` entries with a reason for models without an LM head."""
    out: dict[str, Any] = {}
    for key, model in models.items():
        if not type(model).__name__.endswith("LMHeadModel") and not type(model).__name__.endswith(
            "ForCausalLM"
        ):
            out[key] = None
            out["note"] = f"{type(model).__name__} has no language-model head: no loss"
            continue
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"]
                labels = ids.clone()
                if "attention_mask" in batch:
                    labels[batch["attention_mask"] == 0] = -100
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                n = int((labels[:, 1:] != -100).sum())
                total += float(model(**inputs, labels=labels).loss) * n
                count += n
        out[key] = round(total / max(count, 1), 6)
    return out


def _bar(total: int, enabled: bool, method: str = "weight") -> Any:
    from tqdm.auto import tqdm

    desc = "write zipped A+B" if method == "zip" else "write aligned B"
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


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
