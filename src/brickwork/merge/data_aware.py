"""Data-aware merges: statistics for the streaming executor, and module-level methods.

Two levels, kept apart (DESIGN.md): a tensor-level method that declares ``statistics=``
is streamed tensor by tensor as any other, and receives per model the statistics that the
collector (``brickwork.stats``) measured at module level on that model's calibration data;
a module-level method (``regmean_plusplus``, ``adamerging``) gets the models as
``nn.Module``\\ s and the data, and its result is written by the same writer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.reader import Checkpoint, TensorInfo
from ..checkpoint.writer import CheckpointWriter
from ..errors import DataError, RecipeError, unknown_name
from ..recipe import MergeRecipe, ModelEntry
from ..stats import StatisticsSource, statistics_for
from .plan import _DTYPES
from .registry import MergeMethod, get_method


def _entries(recipe: MergeRecipe, m: MergeMethod) -> list[ModelEntry]:
    if recipe.models is None:
        raise RecipeError(
            f"method '{m.name}' needs calibration data per model and takes 'models:', not "
            "'slices:'; list the models under 'models:' with a 'data:' block each."
        )
    uses_base = m.base != "none" and recipe.base is not None
    entries = [e for e in recipe.models if not (uses_base and e.model == recipe.base)]
    missing = [e.model for e in entries if e.data is None]
    if missing:
        raise DataError(
            f"method '{m.name}' needs calibration data for every model, and "
            f"{', '.join(repr(k) for k in missing)} {'has' if len(missing) == 1 else 'have'} "
            "no 'data:' block. Add one per model entry, e.g.\n"
            "    data: {path: calibration.txt, n_examples: 256, batch_size: 8, max_length: 128}\n"
            "(text tokenised with the model's tokenizer, a .jsonl of texts, or a .safetensors "
            "file of input_ids)."
        )
    return entries


def _load(ck: Checkpoint, entry: ModelEntry, recipe_dir: Path | None) -> tuple[nn.Module, list]:
    from ..align.files import load_module
    from ..stats.data import load_batches

    where = f"model '{entry.model}'"
    if ck.path is None:
        raise DataError(f"{where}: an in-memory state dict cannot be run on data.")
    module = load_module(ck, where)  # with its permutations when the recipe aligns it
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    batches = load_batches(
        entry.data, model_dir=ck.model_dir, vocab_size=vocab, where=where, recipe_dir=recipe_dir
    )
    return module, batches


def _vocab_size(ck: Checkpoint) -> int | None:
    """The vocabulary size in a model's config.json (top level or its text config), for
    checking token ids without loading the model."""
    cfg = ck.config or {}
    vocab = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return vocab if isinstance(vocab, int) else None


def recipe_statistics(
    recipe: MergeRecipe,
    ckpts: dict[str, Checkpoint],
    *,
    recipe_dir: Path | None,
    progress: bool = False,
) -> StatisticsSource:
    """The statistics of every model of ``recipe`` on its ``data:`` block (cached); with
    ``progress`` one line per model and kind on stderr."""
    import sys
    import time

    from ..align.files import load_module
    from ..stats import cached_statistics
    from ..stats.data import load_batches, require_config

    m = get_method(recipe.method)
    files: dict[str, dict[str, Any]] = {}
    for e in _entries(recipe, m):
        ck = ckpts[e.model]
        where = f"model '{e.model}'"
        if ck.path is None:
            raise DataError(f"{where}: an in-memory state dict cannot be run on data.")
        require_config(ck.path, where)
        batches = load_batches(
            e.data, model_dir=ck.model_dir, vocab_size=_vocab_size(ck), where=where,
            recipe_dir=recipe_dir,
        )  # fmt: skip
        files[e.model] = {}
        module = None  # loaded on a cache miss only: a cached merge holds no model in memory
        for kind in m.statistics:
            t0 = time.perf_counter()
            options = {"fisher_estimate": e.data.fisher_estimate, "seed": recipe.seed}
            f = cached_statistics(batches, kind, model_hash=ck.checksum(), **options)
            if f is None:
                module = module if module is not None else load_module(ck, where)
                f = statistics_for(
                    module, batches, kind, model_hash=ck.checksum(), where=where, **options
                )
            if not f.names & set(ck.names):
                loaded = "" if module is None else f" as {type(module).__name__}"
                raise DataError(
                    f"model '{e.model}': none of the {len(f.names)} tensors the statistics "
                    f"cover (e.g. '{next(iter(sorted(f.names)), '')}') is in its checkpoint "
                    f"(e.g. '{ck.names[0] if ck.names else ''}'); transformers loads it"
                    f"{loaded} with names that differ from the file's."
                )
            files[e.model][kind] = f
            if progress:
                how = "read from the cache" if f.hit else f"{time.perf_counter() - t0:.1f}s"
                print(
                    f"statistics ({kind}) of {e.model}: {f.info.get('examples')} examples, {how}",
                    file=sys.stderr,
                )
        del module
    return StatisticsSource(files)


def module_statistics(
    m: MergeMethod,
    modules: Sequence[nn.Module],
    data: Sequence[Iterable[Any]] | None,
    *,
    fisher_estimate: str = "sampled",
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    seed: int = 0,
) -> StatisticsSource:
    """Statistics of in-memory modules (keys ``model0``, ``model1``, ... as
    ``merge_state_dicts`` names them) on their data."""
    data = _check_data(m, modules, data)
    files = {
        f"model{i}": {
            kind: statistics_for(
                mod,
                batches,
                kind,
                fisher_estimate=fisher_estimate,
                seed=seed,
                logits_fn=logits_fn,
                where=f"model {i}",
            )  # fmt: skip
            for kind in m.statistics
        }
        for i, (mod, batches) in enumerate(zip(modules, data))
    }
    return StatisticsSource(files)


def _check_data(
    m: MergeMethod, modules: Sequence[Any], data: Sequence[Iterable[Any]] | None
) -> list[list[Any]]:
    if data is None:
        raise DataError(
            f"method '{m.name}' needs calibration data: pass data=[batches of model 0, "
            "batches of model 1, ...], one iterable of batches per model (dicts such as "
            "{'input_ids': ..., 'attention_mask': ...})."
        )
    if isinstance(data, dict | torch.Tensor) or len(data) != len(modules):
        n = "one mapping/tensor" if isinstance(data, dict | torch.Tensor) else len(data)
        raise DataError(
            f"method '{m.name}': {len(modules)} models but data holds {n}; give a list with "
            "one iterable of batches per model, in the models' order."
        )
    out = [list(d) for d in data]
    for i, d in enumerate(out):
        if not d:
            raise DataError(f"method '{m.name}': the data of model {i} holds no batches.")
    return out


def run_module_level(
    m: MergeMethod,
    modules: Sequence[nn.Module],
    *,
    base: nn.Module | None,
    data: Sequence[Iterable[Any]] | None,
    parameters: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
    logits_fn: Any = None,
    **runtime: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Run module-level method ``m``; parameters are validated against its signature."""
    data = _check_data(m, modules, data)
    if m.base == "required" and base is None:
        raise RecipeError(f"method '{m.name}' needs a base model: pass base=...")
    known = {p.name: p for p in m.params}
    kwargs: dict[str, Any] = {}
    for k, v in (parameters or {}).items():
        if k not in known:
            raise unknown_name(f"parameter of method '{m.name}'", k, known)
        kwargs[known[k].py_name] = known[k].validate(v, where=f"method '{m.name}'")
    if logits_fn is not None:
        runtime["logits_fn"] = logits_fn
    unknown = [k for k in runtime if k not in ("logits_fn", "heads")]
    if unknown:
        raise RecipeError(
            f"method '{m.name}' is module level; it does not take {', '.join(unknown)}."
        )
    return m.func(base, list(modules), data, **kwargs, seed=seed, progress=progress, **runtime)


def merge_module_level(
    recipe: MergeRecipe,
    ckpts: dict[str, Checkpoint],
    out: Path,
    *,
    recipe_dir: Path | None,
    shard_size: str | int,
    force: bool,
    progress: bool,
    write_provenance: Callable[..., None],
) -> Path:
    """``brickwork merge`` of a module-level method: load the models and their data, run
    the method, write the merged module's tensors (the reference checkpoint's names, shapes
    and dtypes) through the shared writer."""
    from ..stats.store import data_hash

    m = get_method(recipe.method)
    entries = _entries(recipe, m)
    modules, data, used = [], [], []
    for e in entries:
        module, batches = _load(ckpts[e.model], e, recipe_dir)
        modules.append(module)
        data.append(batches)
        used.append(
            {
                "model": e.model,
                "kind": "calibration data",
                "data_hash": data_hash(batches, {}),
                "examples": sum(int(next(iter(b.values())).shape[0]) for b in batches),
            }
        )
    base = None
    if recipe.base is not None and m.base != "none":
        from ..align.files import load_module

        base = load_module(ckpts[recipe.base], f"base '{recipe.base}'")
    params = {}
    for k, v in recipe.parameters.items():
        if not isinstance(v, bool | int | float | str):
            raise RecipeError(
                f"parameters.{k}: method '{m.name}' is module level and takes plain values, "
                "not per-tensor conditions or gradients."
            )
        params[k] = v
    merged, info = run_module_level(
        m, modules, base=base, data=data, parameters=params, seed=recipe.seed, progress=progress
    )
    ref_key = recipe.base if base is not None else entries[0].model
    ref = ckpts[ref_key]
    sd = merged.state_dict()
    absent = [n for n in ref.names if n not in sd]
    if absent:
        raise DataError(
            f"method '{m.name}' returned a module without {len(absent)} of the checkpoint's "
            f"tensors (e.g. '{absent[0]}'); transformers loaded {ref_key} as "
            f"{type(merged).__name__}, whose names differ from the file's."
        )
    out_dtype = _DTYPES[recipe.dtype] if recipe.dtype else None
    infos = [TensorInfo(n, ref.info(n).shape, out_dtype or ref.info(n).dtype) for n in ref.names]
    inputs = {k: ck.checksum() for k, ck in ckpts.items()}
    with CheckpointWriter(
        out, infos, shard_size=shard_size, force=force, side_files=ref.model_dir
    ) as writer:
        for i in infos:
            writer.write(i.name, sd[i.name].detach())
        extra = {"statistics": used, "method_info": _jsonable(info)}
        write_provenance(writer, recipe, m, inputs, extra)
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() <= 64 else f"tensor{tuple(x.shape)}"
    if isinstance(x, bool | int | float | str) or x is None:
        return x
    return repr(x)
