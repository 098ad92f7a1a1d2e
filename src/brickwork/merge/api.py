"""Public merge API: files to a directory, and in-memory state dicts / modules."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint.provenance import environment
from ..checkpoint.reader import Checkpoint, StateDictCheckpoint, open_checkpoint
from ..checkpoint.writer import CheckpointWriter
from ..errors import CheckpointError, OutputExistsError, RecipeError
from ..recipe import MergeRecipe, ModelEntry, load_recipe, parse_recipe
from .executor import execute, resolve_device
from .plan import _DTYPES, Plan, build_plan
from .registry import MergeMethod, get_method


def _open_models(recipe: MergeRecipe, recipe_dir: Path | None) -> dict[str, Checkpoint]:
    return {key: _open_path(recipe_dir)(key) for key in recipe.model_paths()}


def _open_path(recipe_dir: Path | None):
    """Opens a model path of a recipe (relative to the recipe's folder if not found as is)."""

    def locate(key: str) -> Path:
        p = Path(key).expanduser()
        if not p.exists() and recipe_dir is not None and (recipe_dir / p).exists():
            p = recipe_dir / p
        return p

    def open_one(key: str) -> Checkpoint:
        p = locate(key)
        if not p.exists() and "+" in key:  # mergekit's `model+lora`: a base and a PEFT adapter
            base, _, lora = key.rpartition("+")
            from ..compress.adapters import AdapterCheckpoint

            if not locate(lora).is_dir() or not locate(base).exists():
                bad = f"adapter '{lora}' is not a directory" if not locate(lora).is_dir() else ""
                bad = bad or f"base '{base}' does not exist"
                raise CheckpointError(
                    f"model '{key}': read as BASE+ADAPTER (mergekit's model+lora) with base "
                    f"'{base}' and adapter '{lora}', but the {bad}. Give an existing base model "
                    "and a PEFT adapter folder."
                )
            return AdapterCheckpoint(open_one(base), locate(lora))
        if p.is_dir() and (p / "adapter_config.json").is_file():
            from ..compress.adapters import AdapterCheckpoint, is_adapter_dir, resolve_adapter_base

            if is_adapter_dir(p):  # an adapter alone: its base from base_model_name_or_path
                return AdapterCheckpoint(open_checkpoint(resolve_adapter_base(p, recipe_dir)), p)
        if not p.exists():
            hint = (
                " It looks like a Hugging Face hub id: brickwork never downloads; download it "
                "first (e.g. `huggingface-cli download ID --local-dir DIR`) and give DIR."
                if key.count("/") == 1 and not key.startswith((".", "/"))
                else ""
            )
            raise CheckpointError(f"model '{key}': no such file or directory.{hint}")
        return open_checkpoint(p)

    return open_one


def _compute_dtype(recipe: MergeRecipe) -> torch.dtype | None:
    """The recipe's compute dtype as a torch dtype; ``None`` for "input" (each tensor's own)."""
    return None if recipe.compute_dtype == "input" else _DTYPES[recipe.compute_dtype]


def check_output_is_not_input(out: Path, ckpts: Mapping[str, Checkpoint]) -> None:
    """Refuse an output path that is, contains or lies inside an input model."""
    o = Path(out).expanduser().resolve()
    for key, ck in ckpts.items():
        if ck.path is None:
            continue
        p = ck.path.resolve()
        if o == p or o in p.parents or p in o.parents:
            raise OutputExistsError(
                f"output {out} overlaps input model '{key}' ({p}); brickwork never writes over its inputs. Choose another output path."
            )


def _model_card(
    recipe: MergeRecipe, m: MergeMethod, inputs: dict[str, str], env: dict[str, Any]
) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, brickwork]",
        "---",
        f"# Merged model ({m.name})",
        "",
        f"Made with brickwork {env['brickwork']} on {env['created']}.",
        "",
        f"**Method:** `{m.name}` — {m.description}" + (f" ({m.reference})" if m.reference else ""),
        "",
        "## Inputs",
        "",
        "| model | role | sha256 (first 16) |",
        "| --- | --- | --- |",
    ]
    for key, digest in inputs.items():
        role = "base" if key == recipe.base else "model"
        lines.append(f"| `{key}` | {role} | `{digest}` |")
    lines += [
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _write_config(
    writer: CheckpointWriter, ck: Checkpoint, plan: Plan, dtype: torch.dtype | None
) -> None:
    cfg = ck.config
    if cfg is None:
        return
    if plan.num_layers is not None:
        old = None
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in cfg:
                old = cfg[key]
                cfg[key] = plan.num_layers
        if isinstance(cfg.get("layer_types"), list) and old:
            types = cfg["layer_types"]
            cfg["layer_types"] = [types[i % len(types)] for i in range(plan.num_layers)]
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = name
    writer.add_text("config.json", json.dumps(cfg, indent=2) + "\n")


def merge(
    recipe: MergeRecipe | Mapping[str, Any] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    seed: int | None = None,
    force: bool = False,
    progress: bool = True,
    compute_dtype: str | None = None,
    device: str = "cpu",
) -> Path:
    """Merge checkpoints on disk as ``recipe`` says and write a model directory at ``out``.

    ``recipe`` is a :class:`MergeRecipe`, a dict, or a YAML path (brickwork or mergekit form).
    ``dtype`` (output) and ``compute_dtype`` (float32, float64, bfloat16, float16 or input)
    override the recipe's. ``device``: where each tensor is computed — cpu (default), cuda,
    cuda:N, or auto (cuda if available); reading and writing stay on the CPU.
    The output appears atomically; on any error nothing is left at ``out``.
    Data-aware methods (regmean, fisher, regmean_plusplus, adamerging) read each model's
    ``data:`` block, load the models with transformers, and record the statistics they used
    in ``brickwork.json`` (statistics are cached under ``$BRICKWORK_CACHE/statistics``).
    """
    recipe_dir = None
    if isinstance(recipe, str | os.PathLike):
        recipe_dir = Path(recipe).parent
        recipe = load_recipe(recipe)
    else:
        recipe = parse_recipe(recipe)
    if seed is not None:
        recipe = recipe.model_copy(update={"seed": seed})
    if dtype is not None:
        recipe = parse_recipe({**recipe.model_dump(), "dtype": dtype}, source="--dtype")
    if compute_dtype is not None:
        recipe = parse_recipe(
            {**recipe.model_dump(), "compute_dtype": compute_dtype}, source="--compute-dtype"
        )
    dev = resolve_device(device)  # before any file is opened: a bad --device fails fast
    out = Path(out)
    ckpts = _open_models(recipe, recipe_dir)
    check_output_is_not_input(out, ckpts)
    method = get_method(recipe.method)
    _check_data_blocks(recipe, method, out, force)
    alignment = None
    if recipe.align is not None:  # permute every model onto align.to before merging
        from ..align.files import align_recipe_models

        if out.exists() and not force:
            raise OutputExistsError(
                f"{out}: already exists. Choose another output path or pass --force to replace it."
            )
        ckpts, alignment = align_recipe_models(
            recipe, ckpts, recipe_dir=recipe_dir, open_path=_open_path(recipe_dir)
        )
    if method.level == "module":
        from .data_aware import merge_module_level

        return merge_module_level(
            recipe, ckpts, out, recipe_dir=recipe_dir, shard_size=shard_size, force=force,
            progress=progress, write_provenance=_write_provenance,
        )  # fmt: skip
    plan = build_plan(recipe, ckpts)
    stats = None
    if method.statistics:
        from .data_aware import recipe_statistics

        stats = recipe_statistics(recipe, ckpts, recipe_dir=recipe_dir, progress=progress)
    out_dtype = _DTYPES[recipe.dtype] if recipe.dtype else None
    with ThreadPoolExecutor(max_workers=1) as pool:  # hash inputs while merging
        digests = {k: pool.submit(ck.checksum) for k, ck in ckpts.items()}
        with CheckpointWriter(
            out,
            [j.info for j in plan.jobs],
            shard_size=shard_size,
            force=force,
            side_files=ckpts[plan.reference].model_dir,
        ) as writer:
            execute(
                plan,
                ckpts,
                writer,
                seed=recipe.seed,
                compute_dtype=_compute_dtype(recipe),
                device=dev,
                progress=progress,
                statistics=stats,
            )
            ref = ckpts[plan.reference]
            _write_config(writer, ref, plan, out_dtype)
            inputs = {k: f.result() for k, f in digests.items()}
            extra = {"alignment": alignment} if alignment is not None else None
            if stats is not None:
                extra = {
                    **(extra or {}),
                    "statistics": stats.provenance(),
                    "regularized": stats.ridges(),
                }
            _write_provenance(writer, recipe, method, inputs, extra)
    return out


def _check_data_blocks(recipe: MergeRecipe, method: MergeMethod, out: Path, force: bool) -> None:
    """A ``data:`` block for a method that uses no data is a mistake (a wrong method name?);
    for one that does, an existing output is refused before the statistics are computed."""
    given = [e.model for e in recipe.models or [] if e.data is not None]
    if given and not method.needs_data:
        raise RecipeError(
            f"models {', '.join(repr(k) for k in given)} have a 'data:' block, but method "
            f"'{method.name}' uses no calibration data. Remove the blocks, or choose a "
            "data-aware method (regmean, fisher, regmean_plusplus, adamerging)."
        )
    if method.needs_data and out.exists() and not force:
        raise OutputExistsError(
            f"{out}: already exists. Choose another output path or pass --force to replace it."
        )


def _write_provenance(
    writer: CheckpointWriter,
    recipe: MergeRecipe,
    method: MergeMethod,
    inputs: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> None:
    """brickwork_recipe.yaml, brickwork.json (recipe, inputs, environment and ``extra``, e.g.
    the statistics a data-aware method used) and the model card."""
    env = environment()
    writer.add_text(
        "brickwork_recipe.yaml",
        yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False),
    )
    record = {
        "kind": "merge",
        "method": recipe.method,
        "seed": recipe.seed,
        "inputs": inputs,
        "environment": env,
        "recipe": recipe.model_dump(mode="json", exclude_none=True),
        **(extra or {}),
    }
    writer.add_text("brickwork.json", json.dumps(record, indent=2, default=str) + "\n")
    writer.add_text("README.md", _model_card(recipe, method, inputs, env))


class _DictSink:
    """Collects outputs; copies any output that shares memory with an input (copied tensors,
    passthrough) so that the returned state dict never aliases the caller's tensors."""

    def __init__(self, ckpts: Mapping[str, Checkpoint]) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._inputs = {
            ck.get(n).untyped_storage().data_ptr() for ck in ckpts.values() for n in ck.names
        }

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.untyped_storage().data_ptr() in self._inputs:
            tensor = tensor.clone()
        self.tensors[name] = tensor


def merge_recipe_in_memory(
    recipe: MergeRecipe | Mapping[str, Any],
    models: Mapping[str, Checkpoint | Mapping[str, torch.Tensor]],
    *,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Merge ``recipe`` (a data-free, tensor-level recipe, models or slices form) with its
    models given in memory: ``models[path]`` is the checkpoint (or state dict) of each path
    the recipe names. The result is the state dict ``brickwork merge`` of the same recipe
    writes, tensor for tensor (the same plan and executor); inputs are never modified."""
    recipe = parse_recipe(recipe) if not isinstance(recipe, MergeRecipe) else recipe
    missing = [p for p in recipe.model_paths() if p not in models]
    if missing:
        raise RecipeError(
            f"the recipe names model(s) {missing} that are not among the given models "
            f"({sorted(models)})"
        )
    ckpts = {
        p: m if isinstance(m, Checkpoint) else StateDictCheckpoint(m, label=p)
        for p, m in models.items()
        if p in recipe.model_paths()
    }
    method = get_method(recipe.method)
    if method.needs_data or recipe.align is not None:
        raise RecipeError(
            f"merge_recipe_in_memory: method '{method.name}' (or align:) needs data or files; "
            "use brickwork.merge(recipe, out)"
        )
    plan = build_plan(recipe, ckpts)
    sink = _DictSink(ckpts)
    execute(plan, ckpts, sink, seed=recipe.seed, compute_dtype=_compute_dtype(recipe),
            device=resolve_device(device), progress=False)  # fmt: skip
    return sink.tensors


def merge_state_dicts(
    method: str,
    models: Sequence[Mapping[str, torch.Tensor] | torch.nn.Module],
    *,
    base: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    on_missing: str = "error",
    compute_dtype: str = "float32",
    device: str = "cpu",
    statistics: Any = None,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts (or modules' state dicts); returns a new state dict.

    ``parameters`` are global (per-model parameters given here apply to every model);
    ``model_parameters[i]`` are model ``i``'s own. Inputs are never modified.
    ``compute_dtype``: float32 (default), float64, bfloat16, float16 or input (each tensor's
    own dtype). ``device``: cpu (default), cuda, cuda:N or auto; results are on the CPU.
    ``statistics``: for data-aware methods, a :class:`brickwork.stats.StatisticsSource`
    whose model keys are ``model0``, ``model1``, ... (:func:`merge_modules` builds it).
    """
    dev = resolve_device(device)
    model_parameters = list(model_parameters or [{}] * len(models))
    if len(model_parameters) != len(models):
        raise ValueError(
            f"model_parameters has {len(model_parameters)} entries for {len(models)} models"
        )
    ckpts: dict[str, Checkpoint] = {
        f"model{i}": open_checkpoint(m)
        if isinstance(m, torch.nn.Module)
        else StateDictCheckpoint(m, label=f"model{i}")
        for i, m in enumerate(models)
    }
    if base is not None:
        ckpts["base"] = (
            open_checkpoint(base)
            if isinstance(base, torch.nn.Module)
            else StateDictCheckpoint(base, label="base")
        )
    recipe = parse_recipe(
        {
            "method": method,
            "base": "base" if base is not None else None,
            "models": [
                ModelEntry(model=f"model{i}", parameters=dict(p)).model_dump()
                for i, p in enumerate(model_parameters)
            ],
            "parameters": dict(parameters or {}),
            "seed": seed,
            "dtype": dtype,
            "compute_dtype": compute_dtype,
            "on_missing": on_missing,
        },
        source=f"merge_state_dicts('{method}')",
    )
    plan = build_plan(recipe, ckpts)
    sink = _DictSink(ckpts)
    execute(
        plan,
        ckpts,
        sink,
        seed=seed,
        compute_dtype=_compute_dtype(recipe),
        device=dev,
        progress=False,
        statistics=statistics,
    )
    return sink.tensors


def merge_modules(
    method: str,
    modules: Sequence[torch.nn.Module],
    *,
    base: torch.nn.Module | None = None,
    data: Sequence[Iterable[Any]] | None = None,
    fisher_estimate: str = "sampled",
    logits_fn: Any = None,
    progress: bool = False,
    **kwargs: Any,
) -> torch.nn.Module:
    """Merge modules of one architecture; returns a new module (a copy of ``base`` or the first).

    Data-aware methods (``brickwork methods``: regmean, fisher, regmean_plusplus,
    adamerging) need ``data``: one iterable of calibration batches per module, each batch
    fed as ``module(**batch)`` (a dict, with ``attention_mask`` marking padding),
    ``module(*batch)`` (a tuple) or ``module(batch)``. Statistics are cached under
    ``$BRICKWORK_CACHE/statistics``. ``fisher_estimate``: sampled (the true Fisher, default),
    exact (classifiers) or empirical (the batches' ``labels``); ``logits_fn`` turns a
    module's output into logits when it has no ``.logits``. Other keywords as
    :func:`merge_state_dicts` (``parameters``, ``model_parameters``, ``seed``, ...).
    """
    m = get_method(method)
    if m.needs_data or data is not None:
        from .data_aware import module_statistics, run_module_level

        if m.level == "module":
            return run_module_level(
                m, modules, base=base, data=data, logits_fn=logits_fn, progress=progress, **kwargs
            )[0]
        if m.statistics:
            kwargs["statistics"] = module_statistics(
                m, modules, data, fisher_estimate=fisher_estimate, logits_fn=logits_fn,
                seed=kwargs.get("seed", 0),
            )  # fmt: skip
    merged = merge_state_dicts(method, modules, base=base, **kwargs)
    out = copy.deepcopy(base if base is not None else modules[0])
    out.load_state_dict(merged)
    return out
