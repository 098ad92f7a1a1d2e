"""``run_bench``: fine-tune (cached), merge with every registered method, evaluate, report."""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BrickworkError
from . import data as D
from . import report
from .evaluate import MAX_COMBOS, Evaluator, grid, select_hyperparameters
from .suites import Suite, Task, make_suite
from .train import Trainer, cache_key, full_state, load_row, save_row, source_hash


class _Bar:
    def __init__(self, progress: Any, task_id: Any) -> None:
        self._p, self._id = progress, task_id

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._id, n)


def _progress_factory(console: Any, enabled: bool):  # -> Progress (see train.py)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextmanager
    def bar(description: str, total: int) -> Iterator[_Bar | None]:
        if not enabled:
            yield None
            return
        cols = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*cols, console=console, transient=False) as p:
            yield _Bar(p, p.add_task(description, total=total))

    return bar


def _n_params(modules: Sequence[dict[str, torch.Tensor]], heads: Sequence[nn.Linear]) -> int:
    return sum(v.numel() for m in modules for v in m.values()) + sum(
        p.numel() for h in heads for p in h.parameters()
    )


def _row(method: str, kind: str, **kw: Any) -> dict[str, Any]:
    row = {
        "method": method,
        "kind": kind,
        "status": "ok",
        "reason": None,
        "per_task": {},
        "avg": None,
        "normalized": None,
        "normalized_per_task": {},
        "params": None,
        "active_params": None,
        "latency_ms": None,
        "seconds": None,
        "train_seconds": None,
        "hyperparameters": {},
        "validation": None,
    }
    row.update(kw)
    return row


def _merge_rows(
    suite: Suite,
    tasks: list[Task],
    ev: Evaluator,
    finetunes: dict[str, tuple[dict[str, torch.Tensor], nn.Linear]],
    methods: Sequence[str] | None,
    *,
    seed: int,
    progress: Any,
    reused: list[str] | None = None,
    use_cache: bool = True,
    costs: Any = None,
) -> list[dict[str, Any]]:
    """One row per merge method. A row computed before from the same fine-tunes, data,
    seed and merge code is read from the cache (its name is appended to ``reused``)."""
    reused = [] if reused is None else reused
    from ..merge.api import merge_state_dicts
    from ..merge.registry import get_method, list_methods

    names = list_methods() if methods is None else [get_method(m).name for m in methods]
    base_full = suite.base_state()
    keys = [k for k in base_full if suite.trainable(k)]
    base = {k: base_full[k] for k in keys}
    models = [{k: finetunes[t.name][0][k] for k in keys} for t in tasks]
    heads = {t.name: finetunes[t.name][1] for t in tasks}
    enc_params = suite.shared_params() + sum(v.numel() for v in base_full.values())
    rows = []
    with progress("merge + select on validation", len(names)) as bar:
        for name in names:
            m = get_method(name)
            t0 = time.perf_counter()
            key = _row_key(suite, tasks, ev.trainer, f"merge:{name}", seed=seed)
            cached = load_row(key) if use_cache else None
            if cached is not None:
                rows.append(cached)
                reused.append(name)
                if bar is not None:
                    bar.advance()
                continue

            def merge(params: dict[str, Any], m: Any = m) -> dict[str, torch.Tensor]:
                merged = merge_state_dicts(
                    m.name, models, base=None if m.base == "none" else base,
                    parameters=params, seed=seed,
                )  # fmt: skip
                return full_state(suite, merged)

            def score_val(state: dict[str, torch.Tensor]) -> dict[str, float]:
                return ev.accuracy(state, heads, tasks, "val")

            combos = grid(m.search_space, cap=2 if suite.quick else MAX_COMBOS)
            sel = select_hyperparameters(combos, merge, score_val, errors=(BrickworkError,))
            if sel.params is None or sel.state is None:
                rows.append(_row(name, "merge", status="skipped", reason=sel.error,
                                 seconds=round(time.perf_counter() - t0, 2)))  # fmt: skip
            else:
                per_task = ev.accuracy(sel.state, heads, tasks, "test")  # the only test read
                rows.append(_row(
                    name, "merge", per_task=per_task, hyperparameters=sel.params,
                    validation={"avg": round(sel.val_avg, 6), "tried": sel.tried},
                    params=enc_params + _n_params([], list(heads.values())),
                    seconds=round(time.perf_counter() - t0, 2),
                    **(costs.same(sel.state, heads) if costs is not None else {}),
                ))  # fmt: skip
            save_row(key, rows[-1])
            if bar is not None:
                bar.advance()
    return rows


def _row_key(suite: Suite, tasks: list[Task], trainer: Trainer, what: str, **extra: Any) -> str:
    return cache_key(
        kind="row", what=what, suite=suite.name, encoder=suite.describe(), quick=suite.quick, models=sorted(trainer.keys.items()),
        data=[(t.name, t.fingerprint(D.SPLITS)) for t in tasks],
        code=source_hash("merge", "bench", "checkpoint"), **extra,
    )  # fmt: skip


def _finish(rows: list[dict[str, Any]], tasks: list[Task]) -> None:
    ind = next(r for r in rows if r["method"] == "individual")["per_task"]
    for r in rows:
        if r["status"] != "ok":
            continue
        r["per_task"] = {k: round(v, 4) for k, v in r["per_task"].items()}
        r["avg"] = round(sum(r["per_task"].values()) / len(tasks), 4)
        r["normalized_per_task"] = {
            t.name: round(r["per_task"][t.name] / ind[t.name], 4) if ind[t.name] else None
            for t in tasks
        }
        vals = [v for v in r["normalized_per_task"].values() if v is not None]
        r["normalized"] = round(sum(vals) / len(vals), 4) if vals else None


def run_bench(
    suite: str = "text",
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
    """Run one benchmark suite and write ``results.json``, ``results.md``, ``normalized.png``
    under ``out`` (default ``bench-results/<suite>-<date>/``). Returns the results dict
    (schema: :data:`brickwork.bench.report.SCHEMA_DOC`). ``methods`` names merge methods
    and MoE rows (:data:`brickwork.bench.moe_rows.MOE_ROWS`); ``moe=False`` drops the MoE
    rows when ``methods`` is None.

    ``jobs``: processes that train the missing fine-tunes (default: 2 on a machine with two
    or more CPUs, 1 with ``quick``). ``threads``: torch threads of this process while the
    bench runs (default 1: on a 2-core machine a second thread made training steps up to
    7x slower whenever anything else ran; None keeps torch's setting)."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_bench(suite, out=out, quick=quick, tasks=tasks, methods=methods, seed=seed,
                          progress=progress, console=console, moe=moe, jobs=jobs)  # fmt: skip
    finally:
        torch.set_num_threads(old_threads)


def _run_bench(
    suite: str,
    *,
    out: Path | None,
    quick: bool,
    tasks: list[str] | None,
    methods: list[str] | None,
    seed: int,
    progress: bool,
    console: Any,
    moe: bool,
    jobs: int | None,
) -> dict[str, Any]:
    from rich.console import Console

    from .costs import Costs
    from .moe_rows import moe_rows, split_methods

    methods, moe_names = split_methods(methods, moe=moe)

    console = console or Console(stderr=True)
    t_start = time.perf_counter()
    bar = _progress_factory(console, progress)
    s = make_suite(suite, quick=quick, seed=seed, tasks=tasks)
    for name, why in s.skipped.items():
        console.print(f"[yellow]skipping task {name}:[/] {why}")
    trainer = Trainer(s, progress=bar)
    task_list = s.tasks
    if jobs is None:
        jobs = 1 if quick else min(2, os.cpu_count() or 1)
    trainer.train_all(task_list, jobs=jobs)  # jobs > 1: missing fine-tunes in processes
    probes = {t.name: trainer.probe(t) for t in task_list}
    finetunes = {t.name: trainer.finetune(t) for t in task_list}
    mt_enc, mt_heads = trainer.multitask(task_list)
    ev = Evaluator(s, trainer)
    base = s.base_state()
    shared = s.shared_params()  # a frozen trunk every model shares: counted once
    top = sum(v.numel() for v in base.values())
    enc_params = shared + top
    ft_states = {t.name: full_state(s, finetunes[t.name][0]) for t in task_list}
    ft_heads = {t.name: finetunes[t.name][1] for t in task_list}
    costs = Costs(s, trainer, task_list, quick=quick)

    rows: list[dict[str, Any]] = []
    with bar("evaluate references", 4) as b:
        t0 = time.perf_counter()
        rows.append(_row("base", "reference", per_task=ev.accuracy(base, probes, task_list, "test"),
                         params=enc_params + _n_params([], list(probes.values())),
                         seconds=round(time.perf_counter() - t0, 2), **costs.same(base, probes)))  # fmt: skip
        _adv(b)
        t0, per = time.perf_counter(), {}
        for t in task_list:
            per |= ev.accuracy(ft_states[t.name], ft_heads, [t], "test")
        rows.append(_row("individual", "reference", per_task=per,
                         params=shared + len(task_list) * top + _n_params([], list(ft_heads.values())),
                         seconds=round(time.perf_counter() - t0, 2),
                         train_seconds=_sum(trainer.timings, "probe:", "finetune:"),
                         **costs({t.name: [ft_states[t.name]] for t in task_list}, ft_heads)))  # fmt: skip
        _adv(b)
        t0 = time.perf_counter()
        rows.append(_row("multitask", "reference",
                         per_task=ev.accuracy(full_state(s, mt_enc), mt_heads, task_list, "test"),
                         params=enc_params + _n_params([], list(mt_heads.values())),
                         seconds=round(time.perf_counter() - t0, 2),
                         train_seconds=trainer.timings.get("multitask"),
                         **costs.same(full_state(s, mt_enc), mt_heads)))  # fmt: skip
        _adv(b)
        t0 = time.perf_counter()
        rows.append(_row("ensemble", "reference",
                         per_task=ev.ensemble_accuracy(list(ft_states.values()), ft_heads, task_list, "test"),
                         params=shared + len(task_list) * top + _n_params([], list(ft_heads.values())),
                         seconds=round(time.perf_counter() - t0, 2),
                         **costs({t.name: list(ft_states.values()) for t in task_list}, ft_heads)))  # fmt: skip
        _adv(b)
    reused: list[str] = []
    rows += _merge_rows(
        s, task_list, ev, finetunes, methods, seed=seed, progress=bar, reused=reused, costs=costs
    )
    rows += moe_rows(s, task_list, ev, finetunes, moe_names, seed=seed, progress=bar,
                     costs=costs, reused=reused)  # fmt: skip
    _finish(rows, task_list)

    results = {
        "schema": report.SCHEMA_VERSION,
        "suite": s.name,
        "seed": seed,
        "quick": quick,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tasks": [
            {
                "name": t.name,
                "description": t.description,
                "classes": list(t.classes),
                "sizes": {k: len(v) for k, v in t.splits.items()},
            }
            for t in task_list
        ],
        "skipped_tasks": dict(s.skipped),
        "train_config": report.asdict_config(s.config),
        "cache": {"hits": trainer.cache_hits, "reused_rows": reused},
        "rows": rows,
        "environment": report.environment(),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }
    report.validate(results)
    out = out or Path("bench-results") / f"{s.name}-{_dt.date.today().isoformat()}"
    report.write(results, out)
    report.print_table(results, console, out=out)
    console.print(f"results written to {out}/ (wall time {results['wall_seconds']:.0f} s)")
    return results


def _adv(b: Any) -> None:
    if b is not None:
        b.advance()


def _sum(timings: dict[str, float], *prefixes: str) -> float:
    return round(sum(v for k, v in timings.items() if k.startswith(prefixes)), 2)
