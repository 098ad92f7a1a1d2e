"""Planning: one :class:`Job` per output tensor, built from headers only (no tensor data).

Every incompatibility (missing tensors, shape mismatches) is collected and raised in one
:class:`IncompatibleModelsError` before anything is computed or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..arch import is_post_weight, layer_name, num_layers, tied_embedding_name
from ..checkpoint.reader import Checkpoint, TensorInfo
from ..errors import IncompatibleModelsError, RecipeError
from ..recipe import MergeRecipe, Params, Slice, SliceSource
from .registry import MergeMethod, get_method

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class Source:
    model: str  # key into the checkpoints mapping
    name: str  # tensor name in that checkpoint


@dataclass
class Job:
    info: TensorInfo  # output name, shape, dtype
    inputs: list[Source] = field(default_factory=list)  # non-base models
    base: Source | None = None
    copy: Source | None = None  # copy verbatim instead of merging
    model_levels: list[list[Params]] = field(default_factory=list)  # per input, most specific first
    global_levels: list[Params] = field(default_factory=list)
    t: float = 0.0  # position in the layer stack, for gradients


@dataclass
class Plan:
    method: MergeMethod
    jobs: list[Job]
    reference: str  # model whose config/tokenizer is copied
    num_layers: int | None  # output layer count when it changed (slices), else None


_ON_MISSING = (
    " (set on_missing: base to copy them from the base, or skip to merge the models that have them)"
)


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.missing: dict[tuple[str, str, str], list[str]] = {}  # (has, lacks, hint) -> names

    def add(self, line: str) -> None:
        self.lines.append(line)

    def add_missing(self, name: str, has: str, lacks: str, *, hint: str = _ON_MISSING) -> None:
        self.missing.setdefault((has, lacks, hint), []).append(name)

    def raise_if_any(self) -> None:
        # one line per pair of models for missing tensors: a model of another architecture
        # lacks all of them, and one line per tensor would hide every other problem
        for (has, lacks, hint), names in self.missing.items():
            eg = ", ".join(f"'{n}'" for n in names[:3]) + (", ..." if len(names) > 3 else "")
            self.lines.append(f"{lacks} lacks {len(names)} tensor(s) that {has} has: {eg}{hint}")
        self.missing = {}
        if self.lines:
            shown = self.lines[:12]
            more = f"\n  ... and {len(self.lines) - 12} more" if len(self.lines) > 12 else ""
            raise IncompatibleModelsError(
                "the models cannot be merged; nothing was written:\n  " + "\n  ".join(shown) + more
            )


def _uses_base(method: MergeMethod) -> bool:
    return method.base != "none"


class _Planner:
    def __init__(
        self, recipe: MergeRecipe, ckpts: dict[str, Checkpoint], out_dtype: torch.dtype | None
    ) -> None:
        self.recipe = recipe
        self.method = get_method(recipe.method)
        self.ckpts = ckpts
        self.out_dtype = out_dtype or (_DTYPES[recipe.dtype] if recipe.dtype else None)
        self.problems = _Problems()
        self.jobs: list[Job] = []

    # -- one output tensor --------------------------------------------------------------
    def emit(
        self,
        out_name: str,
        ref: Source,
        sources: list[tuple[Source, list[Params]]],
        base: Source | None,
        global_levels: list[Params],
        t: float,
    ) -> None:
        if ref.name not in self.ckpts[ref.model]:  # the reference (often the base) lacks it
            if self.recipe.on_missing == "error":
                has = next((src.model for src, _ in sources if src.name in self.ckpts[src.model]),
                           "another model")  # fmt: skip
                self.problems.add_missing(ref.name, has, ref.model)
            return
        rinfo = self.ckpts[ref.model].info(ref.name)
        dtype = rinfo.dtype
        if not dtype.is_floating_point:  # integer buffers, masks: copied, never averaged
            self.jobs.append(Job(TensorInfo(out_name, rinfo.shape, dtype), copy=ref, t=t))
            return
        out_info = TensorInfo(out_name, rinfo.shape, self.out_dtype or dtype)
        present: list[tuple[Source, list[Params]]] = []
        for src, levels in sources:
            ck = self.ckpts[src.model]
            if src.name not in ck and src.name.endswith("lm_head.weight"):
                tied = tied_embedding_name(ck.names)  # tied embeddings: lm_head is the embedding
                if tied is not None and ck.info(tied).shape == rinfo.shape:
                    src = Source(src.model, tied)
            if src.name not in ck:
                if self.recipe.on_missing == "error":
                    self.problems.add_missing(src.name, ref.model, src.model)
                continue
            shape = ck.info(src.name).shape
            if shape != rinfo.shape:
                self.problems.add(
                    f"tensor '{src.name}': shape {list(shape)} in {src.model}, {list(rinfo.shape)} in {ref.model}"
                )
                continue
            present.append((src, levels))
        if base is not None:
            bck = self.ckpts[base.model]
            if base.name not in bck:
                self.problems.add_missing(base.name, ref.model, f"the base {base.model}", hint="")
                return
            if bck.info(base.name).shape != rinfo.shape:
                self.problems.add(
                    f"tensor '{base.name}': shape {list(bck.info(base.name).shape)} in base {base.model}, {list(rinfo.shape)} in {ref.model}"
                )
                return
        if len(present) < len(sources) and self.recipe.on_missing == "base" or not present:
            self.jobs.append(Job(out_info, copy=base or ref, t=t))
            return
        self.jobs.append(
            Job(
                out_info,
                inputs=[s for s, _ in present],
                base=base if _uses_base(self.method) else None,
                model_levels=[lv for _, lv in present],
                global_levels=global_levels,
                t=t,
            )
        )

    # -- models: form ---------------------------------------------------------------------
    def plan_models(self) -> Plan:
        r = self.recipe
        uses_base = _uses_base(self.method) and r.base is not None
        entries = [e for e in r.models or [] if not (uses_base and e.model == r.base)]
        if self.method.needs_base and not entries:
            raise RecipeError(
                f"method '{self.method.name}': every model is the base; list at least one other model."
            )
        ref_key = r.base or entries[0].model
        ref = self.ckpts[ref_key]
        keys = [e.model for e in entries]
        for k in dict.fromkeys(keys + ([r.base] if r.base else [])):
            extra = [
                n for n in self.ckpts[k].names if n not in ref and not n.endswith("lm_head.weight")
            ]
            if extra and r.on_missing == "error":
                self.problems.add(
                    f"{k} has {len(extra)} tensor(s) that {ref_key} lacks, e.g. '{extra[0]}' (on_missing: base or skip drops them)"
                )
        n_layers = num_layers(ref.names, ref.config)
        for name in ref.names:
            ln = layer_name(name)
            if ln is None:  # as mergekit: pre-layer weights at t=0, post-layer (head, norm) at t=1
                t = 1.0 if is_post_weight(name) else 0.0
            else:
                t = ln.index / (n_layers - 1) if n_layers > 1 else 1.0
            sources = [(Source(e.model, name), [e.parameters, r.parameters]) for e in entries]
            base = Source(r.base, name) if uses_base else None
            self.emit(name, Source(ref_key, name), sources, base, [r.parameters], t)
        self.problems.raise_if_any()
        return Plan(self.method, self.jobs, ref_key, None)

    # -- slices: form ---------------------------------------------------------------------
    def _slice_base(self, s: Slice) -> str | None:
        return s.base_model or self.recipe.base

    def _slice_sources(self, s: Slice) -> tuple[list[SliceSource], SliceSource | None]:
        base_key = self._slice_base(s)
        if not _uses_base(self.method) or base_key is None:
            return list(s.sources), None
        others = [src for src in s.sources if src.model != base_key]
        base = next((src for src in s.sources if src.model == base_key), None)
        return others, base

    def _non_layer(self, s: Slice, names: list[str], t: float) -> None:
        r = self.recipe
        others, base_src = self._slice_sources(s)
        base_key = self._slice_base(s) if _uses_base(self.method) else None
        ref_key = base_key or s.sources[0].model
        for name in names:
            sources = [
                (Source(src.model, name), [src.parameters, s.parameters, r.parameters])
                for src in others
            ]
            base = Source(base_key, name) if base_key else None
            self.emit(name, Source(ref_key, name), sources, base, [s.parameters, r.parameters], t)

    def plan_slices(self) -> Plan:
        r = self.recipe
        slices = r.slices or []
        first = self.ckpts[slices[0].sources[0].model]
        pre = [n for n in first.names if layer_name(n) is None and not is_post_weight(n)]
        post = [n for n in first.names if layer_name(n) is None and is_post_weight(n)]
        self._non_layer(slices[0], pre, 0.0)
        out_layer = 0
        for si, s in enumerate(slices):
            others, base_src = self._slice_sources(s)
            if self.method.needs_base and base_src is None:
                self.problems.add(
                    f"slices[{si}]: method '{self.method.name}' needs the base model "
                    f"{self._slice_base(s)} among the slice's sources (with a layer_range)"
                )
                continue
            lead = s.sources[0]
            lead_ck = self.ckpts[lead.model]
            length = lead.layer_range[1] - lead.layer_range[0]
            layer_names: dict[int, list[str]] = {}
            for n in lead_ck.names:
                if (ln := layer_name(n)) is not None:
                    layer_names.setdefault(ln.index, []).append(n)
            for src in s.sources:
                avail = num_layers(self.ckpts[src.model].names, self.ckpts[src.model].config)
                if src.layer_range[1] > avail:
                    self.problems.add(
                        f"slices[{si}]: {src.model} has {avail} layers, layer_range {list(src.layer_range)} asks for more"
                    )
            for j in range(length):
                t = j / (length - 1) if length > 1 else 1.0
                for n in layer_names.get(lead.layer_range[0] + j, []):
                    ln = layer_name(n)

                    def at(src: SliceSource, ln=ln, j=j) -> str:
                        return ln.with_index(src.layer_range[0] + j)

                    sources = [
                        (Source(src.model, at(src)), [src.parameters, s.parameters, r.parameters])
                        for src in others
                    ]
                    base = Source(base_src.model, at(base_src)) if base_src else None
                    ref = base or Source(lead.model, n)
                    self.emit(
                        ln.with_index(out_layer + j),
                        ref,
                        sources,
                        base,
                        [s.parameters, r.parameters],
                        t,
                    )
            out_layer += length
        self._non_layer(slices[-1], post, 1.0)
        self.problems.raise_if_any()
        ref_key = self._slice_base(slices[0]) or slices[0].sources[0].model
        return Plan(self.method, self.jobs, ref_key, out_layer)


def build_plan(
    recipe: MergeRecipe, ckpts: dict[str, Checkpoint], *, out_dtype: torch.dtype | None = None
) -> Plan:
    planner = _Planner(recipe, ckpts, out_dtype)
    return planner.plan_slices() if recipe.slices is not None else planner.plan_models()


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Resolve a parameter setting for one tensor: conditions (first whose ``filter`` is a
    substring of the name, or has none), then gradients (lists) interpolated at ``t``.
    Returns ``None`` when no condition matches (the next level is consulted)."""
    from ..recipe import Condition

    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(c, Condition) for c in setting):
            for c in setting:
                if c.filter in (None, "*") or c.filter in tensor_name:
                    return evaluate_setting(c.value, tensor_name, t)
            return None
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        pos = t * (len(setting) - 1)
        i0 = int(pos)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = pos - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def resolve_parameters(method: MergeMethod, job: Job) -> dict[str, Any]:
    """Keyword arguments for ``method.func`` on this job (per-model ones as lists)."""
    kwargs: dict[str, Any] = {}
    name = job.info.name

    def lookup(levels: list[Params], spec) -> Any:
        for params in levels:
            if spec.name in params:
                v = evaluate_setting(params[spec.name], name, job.t)
                if v is not None:
                    return spec.validate(v, where=f"tensor '{name}'")
        if spec.required:
            raise RecipeError(
                f"method '{method.name}' needs parameter '{spec.name}' for tensor '{name}'."
            )
        return spec.default

    for spec in method.params:
        if spec.per_model:
            kwargs[spec.py_name] = [lookup(levels, spec) for levels in job.model_levels]
        else:
            kwargs[spec.py_name] = lookup(job.global_levels, spec)
    return kwargs
