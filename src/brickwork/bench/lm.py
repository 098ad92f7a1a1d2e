"""``brickwork bench --suite lm``: a small Llama pretrained on Debian text, one fine-tune per
domain, every registered merge method and upcycled Mixtral MoEs of the fine-tunes, scored by
held-out perplexity.

Rows: ``base``; ``individual`` (each fine-tune on its own domain); one row per registered
merge method (``merge_state_dicts`` of the fine-tunes, hyperparameters from the method's
``search_space`` chosen on the validation split); ``moe_<router>``: the fine-tunes upcycled
into a Mixtral through ``upcycle_from_recipe``, the code path of ``brickwork route upcycle``,
one row per router mode (top-k and the non-FFN tensors, base's or averaged, chosen on
validation); the compression rows (kind ``compress``, :mod:`brickwork.bench.lm_compress_rows`:
LoRA-extracted, pruned and SVD-LLM-factorised fine-tunes, each domain scored by its own
compressed fine-tune like ``individual``). The test split is read once per row, after the
selection. ``latency_ms`` (reference and compression rows): forward time per sequence of one
fixed validation batch, the fastest of a few repeats
(:func:`brickwork.bench.lm_rows.latency_ms`).

Scores: per domain the perplexity ``exp(L)`` of the test sequences (``L``: the mean over
sequences of each sequence's mean next-token loss); ``normalized`` = mean over domains of
``(L_base - L_row) / (L_base - L_finetune)`` (1: the row keeps each fine-tune's gain, 0: no
better than the base); 95 % bootstrap intervals over test sequences, the same resamples for
every row (:mod:`brickwork.bench.stats`); ``vs_linear``: the paired comparison of
``normalized`` with the ``linear`` row.

Written under ``out``: ``models/`` (base and fine-tunes, Hugging Face directories with the
tokenizer), ``recipes/<row>.yaml`` (``brickwork merge`` / ``brickwork route upcycle``
recipes that rebuild each row from ``models/``), ``results.json``, ``results.md``,
``normalized.png``.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..errors import BrickworkError
from . import lm_data as LD
from . import lm_report as report
from . import lm_train as LT
from . import stats as S
from .compress_names import split_compress
from .lm_compress_rows import compress_key, compress_rows
from .lm_rows import (
    MOE_ROUTERS,
    Evaluator,
    advance,
    data_rows,
    latency_batch,
    latency_ms,
    mean_losses,
    merge_rows,
    moe_rows,
    new_row,
    router_texts,
    score_rows,
    write_examples,
)
from .lm_train import Models, read_json
from .train import load_row, save_row, source_hash

__all__ = ["MOE_ROUTERS", "Evaluator", "Models", "run_lm_bench", "score_rows", "split_names"]


@functools.cache  # once per process: the code it runs, not later edits on disk
def _code_hash() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256(source_hash("merge", "checkpoint", "route").encode())
    # not lm_train.py: the models a row reads are in its key by their own hashes
    for f in ("lm.py", "lm_rows.py", "lm_data.py", "stats.py", "evaluate.py"):
        h.update((here / f).read_bytes())
    return h.hexdigest()[:16]


def _dpkg_version(pkg: str) -> str | None:
    import subprocess

    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                           text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


# ----------------------------------------------------------------------------- the run


def split_names(methods: Sequence[str] | None, *, moe: bool) -> tuple[list[str] | None, list[str]]:
    """(merge methods or None for all, router modes) of ``--methods`` (``moe_<router>``);
    the compression rows' names (:func:`split_compress`) are neither."""
    if methods is None:
        return None, list(MOE_ROUTERS) if moe else []
    methods = split_compress(methods)[0]
    merges = [m for m in methods if not m.startswith("moe_")]
    routers = [m.removeprefix("moe_") for m in methods if m.startswith("moe_")]
    unknown = [r for r in routers if r not in MOE_ROUTERS]
    if unknown:
        raise BrickworkError(
            f"unknown MoE row(s) {', '.join('moe_' + u for u in unknown)}; known: "
            + ", ".join(f"moe_{r}" for r in MOE_ROUTERS)
            + "."
        )
    return merges, routers


def run_lm_bench(
    *,
    out: Path | None = None,
    quick: bool = False,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    console: Any = None,
    moe: bool = True,
    jobs: int | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run the LM suite and write ``models/``, ``recipes/``, ``results.json``, ``results.md``
    and ``normalized.png`` under ``out`` (default ``bench-results/lm-<date>/``). ``tasks``:
    domains (default: every installed one); ``methods``: merge methods, ``moe_<router>``
    and compression rows (:data:`~brickwork.bench.compress_names.COMPRESS_ROWS`); ``jobs``:
    processes training fine-tunes (default 2; 1 with ``quick``)."""
    from transformers.utils import logging as hf_logging

    old, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # "Loading weights" bars, one per model loaded
    try:
        return _run(out=out, quick=quick, domains=tasks, methods=methods, seed=seed,
                    progress=progress, console=console, moe=moe, jobs=jobs)  # fmt: skip
    finally:
        torch.set_num_threads(old)
        if bars:
            hf_logging.enable_progress_bar()


def _run(*, out: Path | None, quick: bool, domains: list[str] | None,
         methods: list[str] | None, seed: int, progress: bool, console: Any, moe: bool,
         jobs: int | None) -> dict[str, Any]:  # fmt: skip
    from rich.console import Console

    from .data import MissingDataError
    from .runner import _progress_factory

    console = console or Console(stderr=True)
    t_start = time.perf_counter()
    merges, routers = split_names(methods, moe=moe)
    compress = split_compress(methods)[1]
    from .runner import _split_data_aware

    merges, aware = _split_data_aware(merges)
    bar = _progress_factory(console, progress)
    cfg = LT.QUICK if quick else LT.FULL
    texts, skipped = LD.load_domains(domains, seed)
    for name, why in skipped.items():
        console.print(f"skipping domain {name}: {why}", markup=False)
    if len(texts) < 2:
        raise MissingDataError(
            f"the LM suite needs at least two domains; readable: {list(texts) or 'none'}. "
            + " ".join(skipped.values())
        )
    jobs = jobs or (1 if quick else min(2, os.cpu_count() or 1))
    models = Models(cfg, texts, seed)
    models.prepare(jobs=jobs, bar=bar)
    tok = models.tokenizer
    splits, ev, row_key = _context_parts(models, texts, cfg, seed)
    reused: list[str] = []
    refs = _reference_rows(models, ev, row_key, reused, bar)
    ref_val = (refs[0].pop("_val"), refs[1].pop("_val"))
    spec = (quick, list(texts), seed)
    in_workers = _prefill(spec, row_key, merges, aware, routers, compress, jobs=jobs, bar=bar)
    rows = refs + merge_rows(models, ev, ref_val, merges, seed=seed, quick=quick,
                             row_key=row_key, reused=reused, bar=bar)  # fmt: skip
    rows += data_rows(models, ev, ref_val, aware, seed=seed, quick=quick, row_key=row_key,
                      reused=reused, bar=bar)  # fmt: skip
    rows += moe_rows(models, ev, ref_val, routers, seed=seed, quick=quick, row_key=row_key,
                     reused=reused, bar=bar)  # fmt: skip
    rows += compress_rows(models, ev, compress, row_key=row_key, reused=reused, bar=bar)
    boot = S.Bootstrap({d: len(x) for d, x in splits["test"].items()}, seed=seed)
    score_rows(rows, boot)
    reused[:] = [n for n in reused if n not in in_workers]  # computed by a worker, this run

    out = Path(out) if out is not None else Path("bench-results") / f"lm-{_dt.date.today()}"
    model_dirs = _export(models, out)
    results = {
        "schema": report.SCHEMA_VERSION, "suite": "lm", "metric": "perplexity", "seed": seed,
        "quick": quick, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tasks": [{
            "name": d, "description": t.domain.description, "packages": {
                p: _dpkg_version(p) for p, path in zip(t.domain.packages, t.domain.paths)
                if path.exists()},
            "n_train": len(t.buckets["finetune"]), "n_pretrain": len(t.buckets["pretrain"]),
            "n_val": len(splits["val"][d]), "n_test": len(splits["test"][d]),
            "sizes": {"pretrain_docs": len(t.buckets["pretrain"]),
                      "finetune_docs": len(t.buckets["finetune"]),
                      "finetune_seqs": cfg.finetune_steps * cfg.batch_size,
                      "val_seqs": len(splits["val"][d]), "test_seqs": len(splits["test"][d])},
        } for d, t in texts.items()],
        "skipped_tasks": skipped, "train_config": asdict(cfg),
        "model": {"architecture": "LlamaForCausalLM", "vocab_size": len(tok),
                  "params": sum(v.numel() for v in models.state(models.base_key).values())},
        "models": model_dirs,
        "cache": {"hits": models.hits, "reused_rows": reused},
        "bootstrap": {"resamples": boot.n, "seed": seed, "level": S.LEVEL},
        "rows": rows, "environment": _environment(),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }  # fmt: skip
    report.write_recipes(results, out)
    _write_calibration(rows, models, splits["val"], out / "recipes" / "calibration")
    if routers:  # the files the MoE recipes' examples_file entries name
        write_examples(router_texts(models)[1], out / "recipes" / "router_text")
    report.validate(results)
    report.write(results, out)
    report.print_table(results, console, out=out)
    console.print(f"results written to {out}/ (wall time {results['wall_seconds']:.0f} s)",
                  markup=False)  # fmt: skip
    return results


def _context_parts(models: Models, texts: Any, cfg: Any, seed: int) -> tuple[Any, Any, Any]:
    """(val/test token splits, evaluator, row-cache key function) of prepared ``models``."""
    tok = models.tokenizer
    splits = {
        split: {d: torch.tensor(LD.sequences(tok, t.buckets[split], cfg.seq_len, n))
                for d, t in texts.items()}
        for split, n in (("val", cfg.val_seqs), ("test", cfg.test_seqs))
    }  # fmt: skip
    code = _code_hash()
    data_fp = [(d, t.fingerprint()) for d, t in texts.items()]

    def row_key(what: str) -> str:
        return LT.model_key(f"row:{what}", base=models.base_key, models=models.keys,
                            data=data_fp, cfg=asdict(cfg), seed=seed, code=code)  # fmt: skip

    return splits, Evaluator(splits), row_key


_CONTEXT: dict[Any, dict[str, Any]] = {}


def _row_job(spec: tuple[Any, ...], kind: str, name: str) -> str:
    """Worker process: one merge, data-aware, MoE or compression row into the row cache
    (1 thread)."""
    from transformers.utils import logging as hf_logging

    from .runner import _progress_factory

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    quick, domains, seed = spec
    key = repr(spec)
    if key not in _CONTEXT:
        cfg = LT.QUICK if quick else LT.FULL
        texts, _ = LD.load_domains(domains, seed)
        models = Models(cfg, texts, seed)
        bar = _progress_factory(None, False)
        models.prepare(jobs=1, bar=bar)
        _, ev, row_key = _context_parts(models, texts, cfg, seed)
        refs = _reference_rows(models, ev, row_key, [], bar)  # from the row cache
        ref_val = (refs[0]["_val"], refs[1]["_val"])
        _CONTEXT[key] = dict(models=models, ev=ev, row_key=row_key, ref_val=ref_val, bar=bar)
    c = _CONTEXT[key]
    if kind == "compress":
        compress_rows(c["models"], c["ev"], [name], row_key=c["row_key"], reused=[], bar=c["bar"])
        return name
    fn = {"merge": merge_rows, "data": data_rows, "moe": moe_rows}[kind]
    fn(c["models"], c["ev"], c["ref_val"], [name], seed=seed, quick=quick,
       row_key=c["row_key"], reused=[], bar=c["bar"])  # fmt: skip
    return name


#: The slowest rows first (measured on the LM suite).
_SLOW_FIRST = ("data:regmean_plusplus", "data:adamerging", "data:fisher", "moe:train",
               "merge:wudi", "moe:task")  # fmt: skip


def _prefill(spec: tuple[Any, ...], row_key: Callable[[str], str], merges: list[str] | None,
             aware: list[str], routers: list[str], compress: Sequence[str] = (), *, jobs: int,
             bar: Callable[[str, int], Any]) -> set[str]:  # fmt: skip
    """With ``jobs > 1``, the rows missing from the row cache are computed in ``jobs``
    worker processes of one torch thread (the run then reads them from the cache in its
    usual order); returns their names (``moe_<router>`` for MoE rows)."""
    from ..merge.registry import list_methods

    if jobs <= 1:
        return set()
    todo = [("merge", n) for n in (list_methods() if merges is None else merges)]
    todo += [("data", n) for n in aware] + [("moe", r) for r in routers]
    todo = [(k, n) for k, n in todo
            if load_row(row_key(f"{'moe' if k == 'moe' else 'merge'}:{n}")) is None]  # fmt: skip
    todo += [("compress", n) for n in compress if load_row(compress_key(row_key, n)) is None]
    from .runner import rows_in_workers

    done = rows_in_workers(_row_job, spec, todo, _SLOW_FIRST, jobs=jobs, progress=bar)
    moe = {n for k, n in todo if k == "moe"}
    return {f"moe_{n}" if n in moe else n for n in done}


def _reference_rows(models: Models, ev: Evaluator, row_key: Callable[[str], str],
                    reused: list[str], bar: Callable[[str, int], Any]) -> list[dict[str, Any]]:  # fmt: skip
    """``base`` and ``individual``, with test losses (``_losses``) and mean val losses
    (``_val``: the references of the validation score)."""
    n = sum(v.numel() for v in models.state(models.base_key).values())
    domains = list(models.keys)
    key = row_key("references")
    if (cached := load_row(key)) is not None:
        reused += ["base", "individual"]
        return cached["rows"]
    with bar("evaluate base and fine-tunes", 1 + len(domains)) as b:
        t0 = time.perf_counter()
        base = models.load(models.base_key)
        bt, bv = ev.losses(base, "test"), ev.losses(base, "val")
        lat_batch = latency_batch(ev)
        base_lat = latency_ms(base, lat_batch)
        advance(b)
        rows = [new_row("base", "reference", params=n, active_params=n, latency_ms=base_lat,
                        seconds=round(time.perf_counter() - t0, 2),
                        train_seconds=models.train_seconds.get("base"),
                        _losses={d: v.tolist() for d, v in bt.items()}, _val=mean_losses(bv))]  # fmt: skip
        t0, it, iv, lat = time.perf_counter(), {}, {}, []
        for d, k in models.keys.items():
            ft = models.load(k)
            it |= ev.losses(ft, "test", [d])
            iv |= ev.losses(ft, "val", [d])
            lat.append(latency_ms(ft, lat_batch))
            advance(b)
    ts = [models.train_seconds.get(d) for d in domains]
    rows.append(new_row("individual", "reference", params=n * len(domains), active_params=n,
                        latency_ms=round(sum(lat) / len(lat), 4),
                        seconds=round(time.perf_counter() - t0, 2),
                        train_seconds=round(sum(t for t in ts if t), 2) if any(ts) else None,
                        _losses={d: v.tolist() for d, v in it.items()}, _val=mean_losses(iv)))  # fmt: skip
    save_row(key, {"rows": rows})
    return [dict(r) for r in rows]


def _write_calibration(rows: list[dict[str, Any]], models: Models,
                       val: dict[str, torch.Tensor], where: Path) -> None:  # fmt: skip
    """The input ids the data-aware rows' recipes name: ``<domain>-<n>.safetensors`` (n
    fine-tuning sequences) and ``<domain>-val.safetensors`` (AdaMerging's)."""
    from safetensors.torch import save_file

    from .lm_rows import calibration

    names = {Path(e["data"]["path"]).name for r in rows if r["status"] == "ok" and r.get("recipe")
             for e in r["recipe"].get("models", []) if "data" in e}  # fmt: skip
    sizes = {n.rsplit("-", 1)[1].removesuffix(".safetensors") for n in names}
    for size in sizes:
        where.mkdir(parents=True, exist_ok=True)
        xs = val if size == "val" else calibration(models, int(size))
        for d, x in xs.items():
            save_file({"input_ids": x.contiguous()}, str(where / f"{d}-{size}.safetensors"))


def _export(models: Models, out: Path) -> dict[str, str]:
    """The base and fine-tunes under ``out/models/`` (through the shared writer; skipped
    when the same model is already there)."""
    dirs = {}
    for name, key in [("base", models.base_key), *models.keys.items()]:
        dst = out / "models" / name
        dirs[name] = f"models/{name}"
        if read_json(dst / "brickwork.json").get("cache_key") == key:
            continue
        LT.export_model(models.dir(key), dst, record={
            "kind": "bench.lm.model", "role": name, "cache_key": key,
            **{k: v for k, v in read_json(models.dir(key) / "brickwork.json").items()
               if k not in ("environment",)},
        })  # fmt: skip
    return dirs


def _environment() -> dict[str, Any]:
    from .report import environment

    env = environment()
    from importlib import metadata

    try:
        env["packages"]["tokenizers"] = metadata.version("tokenizers")
    except metadata.PackageNotFoundError:
        env["packages"]["tokenizers"] = None
    return env
