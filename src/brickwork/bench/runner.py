"""``run_bench``: fine-tune (cached), merge with every registered method, evaluate, report."""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import BrickworkError
from . import data as D
from . import report, stats
from .evaluate import (
    MAX_COMBOS,
    Evaluator,
    accuracies,
    from_bits,
    grid,
    select_hyperparameters,
    to_bits,
)
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


#: Bump when the stored form of a row changes (3: per-example correctness in ``correct``).
ROW_VERSION = 3


def _row(
    method: str, kind: str, *, correct: dict[str, np.ndarray] | None = None, **kw: Any
) -> dict[str, Any]:
    """A results row; ``correct[task]``: per test example, right or wrong (its accuracy
    is ``per_task``, its bits are stored, the intervals are drawn from it)."""
    row = {
        "method": method,
        "kind": kind,
        "status": "ok",
        "reason": None,
        "per_task": accuracies(correct) if correct is not None else {},
        "correct": {t: to_bits(c) for t, c in correct.items()} if correct is not None else {},
        "avg": None,
        "avg_ci": None,
        "normalized": None,
        "normalized_ci": None,
        "vs_linear": None,
        "normalized_per_task": {},
        "params": None,
        "active_params": None,
        "latency_ms": None,
        "seconds": None,
        "train_seconds": None,
        "hyperparameters": {},
        "validation": None,
        "statistics": None,
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
            cached = load_cached_row(key) if use_cache else None
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
                correct = ev.correct(sel.state, heads, tasks, "test")  # the only test read
                rows.append(_row(
                    name, "merge", correct=correct, hyperparameters=sel.params,
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
        code=source_hash("merge", "bench", "checkpoint"), rows=ROW_VERSION, **extra,
    )  # fmt: skip


def _align_key(suite: Suite, tasks: list[Task], trainer: Trainer, what: str, **extra: Any) -> str:
    """An alignment row's key: that of a merge row, plus the align package's sources."""
    return _row_key(suite, tasks, trainer, what, align_code=source_hash("align"), **extra)


def load_cached_row(key: str) -> dict[str, Any] | None:
    """A cached row, or None when there is none or it predates per-example correctness."""
    row = load_row(key)
    if row is None or (row.get("status") == "ok" and not row.get("correct")):
        return None
    return row


def _finish(rows: list[dict[str, Any]], tasks: list[Task], *, seed: int = 0) -> None:
    """Fill in every ok row's ``avg``, ``normalized`` (per task and averaged), their 95 %
    bootstrap intervals and ``vs_linear``."""
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
    intervals(rows, {t.name: len(t.splits["test"]) for t in tasks}, seed=seed)


def intervals(rows: list[dict[str, Any]], sizes: dict[str, int], *, seed: int = 0) -> None:
    """Set ``avg_ci``, ``normalized_ci`` and ``vs_linear`` of every ok row from its
    per-example ``correct`` bits: the same :class:`~brickwork.bench.stats.Bootstrap`
    resamples of each task's test examples (``sizes[task]`` of them) for every row;
    *normalized* is recomputed on each resample against the resampled ``individual`` row;
    ``vs_linear`` compares *normalized* with ``linear``'s on the same resamples (merge and
    MoE rows; None for references, for ``linear`` and when there is no ``linear`` row)."""
    ok = [r for r in rows if r["status"] == "ok"]
    boot = stats.Bootstrap(sizes, seed=seed)
    means = {
        r["method"]: boot.means({t: from_bits(r["correct"][t]) for t in sizes}) for r in ok
    }  # method -> task -> (n,) resampled accuracies
    ref = means["individual"]
    norm = {m: stats.normalized_accuracy(v, ref) for m, v in means.items()}
    lin = norm.get("linear")
    for r in ok:
        m = r["method"]
        r["avg_ci"] = _ci(stats.average(means[m]))
        r["normalized_ci"] = _ci(norm[m])
        compared = lin is not None and r["kind"] != "reference" and m != "linear"
        r["vs_linear"] = stats.compare(norm[m], lin) if compared else None


def _ci(replicates: np.ndarray) -> list[float]:
    lo, hi = stats.interval(replicates)
    return [round(lo, 4), round(hi, 4)]


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
    seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run one benchmark suite and write ``results.json``, ``results.md``, ``normalized.png``
    and ``params.png`` under ``out`` (default ``bench-results/<suite>-<date>/``). Returns the
    results dict
    (schema: :data:`brickwork.bench.report.SCHEMA_DOC`). ``methods`` names merge methods,
    MoE rows (:data:`brickwork.bench.moe_rows.MOE_ROWS`) and compression rows
    (:data:`brickwork.bench.compress_names.COMPRESS_ROWS`, :mod:`.compress_rows`);
    ``moe=False`` drops the MoE rows when ``methods`` is None.

    ``jobs``: processes that train the missing fine-tunes (default: 2 on a machine with two
    or more CPUs, 1 with ``quick``). ``threads``: torch threads of this process while the
    bench runs (default 1: on a 2-core machine a second thread made training steps up to
    7x slower whenever anything else ran; None keeps torch's setting).

    ``seed`` draws the splits (and the digits suite's base) and, by default, seeds the
    training and the merges. ``seeds`` (e.g. ``[0, 1, 2]``): training seeds, the bench once
    per seed on the same splits and base (fine-tunes, multitask model, merges and MoE rows
    redone); ``out`` gets the first seed's results plus a ``seeds`` block (per row mean,
    standard deviation and per-seed values of *normalized* and *avg*), ``out/seed-<s>/``
    each other seed's full results. One seed (the default) costs one run, as before."""
    from rich.console import Console

    console = console or Console(stderr=True)
    values = list(dict.fromkeys(seeds)) if seeds else [seed]  # training seeds
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        runs = []
        for i, sd in enumerate(values):
            if len(values) > 1:
                console.print(f"[bold]training seed {sd}[/] ({i + 1} of {len(values)})")
            runs.append(_run_bench(suite, quick=quick, tasks=tasks, methods=methods, seed=seed,
                                   train_seed=sd,
                                   progress=progress, console=console, moe=moe, jobs=jobs))  # fmt: skip
    finally:
        torch.set_num_threads(old_threads)
    results = runs[0]
    out = out or Path("bench-results") / f"{results['suite']}-{_dt.date.today().isoformat()}"
    for other in runs[1:]:
        report.validate(other)
        report.write(other, Path(out) / f"seed-{other['train_seed']}")
    if len(runs) > 1:
        results["seeds"] = seed_summary(runs)
    report.validate(results)
    report.write(results, out)
    report.print_table(results, console, out=out)
    wall = sum(r["wall_seconds"] for r in runs)
    console.print(f"results written to {out}/ (wall time {wall:.0f} s)")
    return results


def seed_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``seeds`` block of several runs' results (one per training seed): per row, in the first
    run's order, ``normalized`` and ``avg`` as mean, sample std and per-seed values (None
    where the row was skipped or missing in a run)."""
    methods = list(dict.fromkeys(r["method"] for run in runs for r in run["rows"]))
    by_run = [{r["method"]: r for r in run["rows"]} for run in runs]
    rows = {
        m: {k: stats.across_seeds([(b.get(m) or {}).get(k) for b in by_run])
            for k in ("normalized", "avg")}
        for m in methods
    }  # fmt: skip
    return {"values": [run["train_seed"] for run in runs], "rows": rows}


def _run_bench(
    suite: str,
    *,
    quick: bool,
    tasks: list[str] | None,
    methods: list[str] | None,
    seed: int,
    train_seed: int,
    progress: bool,
    console: Any,
    moe: bool,
    jobs: int | None,
) -> dict[str, Any]:
    """One training seed's results (validated and written by :func:`run_bench`)."""
    from .compress_names import split_compress
    from .compress_rows import compress_rows
    from .costs import Costs
    from .data_rows import data_rows
    from .moe_rows import moe_rows, split_methods
    from .scratch import align_rows, split_align_rows

    t_start = time.perf_counter()
    bar = _progress_factory(console, progress)
    s = make_suite(suite, quick=quick, seed=seed, tasks=tasks)
    if methods is None and s.default_rows is not None:
        methods = list(s.default_rows)
    methods, align_names = split_align_rows(methods)
    _check_row_names(methods)
    methods, compress_names = split_compress(methods)
    methods, moe_names = split_methods(methods, moe=moe)
    methods, data_names = _split_data_aware(methods)
    for why, names in _group_skipped(s.skipped).items():  # one line per missing package
        console.print(
            f"[yellow]skipping task{'s' if len(names) > 1 else ''} {', '.join(names)}:[/] {why}"
        )
    trainer = Trainer(s, progress=bar, seed=train_seed)
    task_list = s.tasks
    if jobs is None:
        jobs = 1 if quick else min(2, os.cpu_count() or 1)
    trainer.train_all(task_list, jobs=jobs)  # jobs > 1: missing fine-tunes in processes
    probes = {t.name: trainer.probe(t) for t in task_list}
    finetunes = {t.name: trainer.finetune(t) for t in task_list}
    mt_enc, mt_heads = trainer.multitask(task_list)
    spec = (s.name, s.quick, s.seed, [t.name for t in task_list], asdict(s.config), train_seed)
    in_workers = prefill_rows(spec, s, trainer, methods, data_names, moe_names, jobs=jobs,
                              progress=bar, align_names=align_names,
                              compress_names=compress_names)  # fmt: skip
    ev = Evaluator(s, trainer)
    base = s.base_state()
    shared = s.shared_params()  # a frozen trunk every model shares: counted once
    top = sum(v.numel() for v in base.values())
    enc_params = shared + top
    ft_states = {t.name: full_state(s, finetunes[t.name][0]) for t in task_list}
    ft_heads = {t.name: finetunes[t.name][1] for t in task_list}
    costs = Costs(s, trainer, task_list, quick=quick)

    reused: list[str] = []

    def reference(name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A reference row, read from the row cache when the same fine-tunes, data and
        code computed it before (its name then goes to ``reused``)."""
        key = _row_key(s, task_list, trainer, f"reference:{name}", seed=train_seed)
        row = load_cached_row(key)
        if row is None:
            t0 = time.perf_counter()
            row = compute()
            row["seconds"] = round(time.perf_counter() - t0, 2)
            save_row(key, row)
        else:
            reused.append(name)
        _adv(b)
        return row

    def individual() -> dict[str, Any]:
        per: dict[str, np.ndarray] = {}
        for t in task_list:
            per |= ev.correct(ft_states[t.name], ft_heads, [t], "test")
        return _row("individual", "reference", correct=per,
                    params=shared + len(task_list) * top + _n_params([], list(ft_heads.values())),
                    train_seconds=_sum(trainer.timings, "probe:", "finetune:"),
                    **costs({t.name: [ft_states[t.name]] for t in task_list}, ft_heads))  # fmt: skip

    def base_correct() -> dict[str, np.ndarray]:
        """Each probe on the encoder it was trained on (the base, or the task's own start)."""
        if s.shared_base:
            return ev.correct(base, probes, task_list, "test")
        per: dict[str, np.ndarray] = {}
        for t in task_list:
            start = full_state(s, s.start_encoder([t], train_seed).state_dict())
            per |= ev.correct(start, probes, [t], "test")
        return per

    rows: list[dict[str, Any]] = []
    with bar("evaluate references", 4 if s.shared_base else 3) as b:
        rows.append(reference("base", lambda: _row(
            "base", "reference", correct=base_correct(),
            params=enc_params + _n_params([], list(probes.values())), **costs.same(base, probes),
        )))  # fmt: skip
        rows.append(reference("individual", individual))
        rows.append(reference("multitask", lambda: _row(
            "multitask", "reference",
            correct=ev.correct(full_state(s, mt_enc), mt_heads, task_list, "test"),
            params=enc_params + _n_params([], list(mt_heads.values())),
            train_seconds=trainer.timings.get("multitask"),
            **costs.same(full_state(s, mt_enc), mt_heads),
        )))  # fmt: skip
        if s.shared_base:  # a task's head reads only its own network's features otherwise
            rows.append(reference("ensemble", lambda: _row(
                "ensemble", "reference",
                correct=ev.ensemble_correct(list(ft_states.values()), ft_heads, task_list, "test"),
                params=shared + len(task_list) * top + _n_params([], list(ft_heads.values())),
                **costs({t.name: list(ft_states.values()) for t in task_list}, ft_heads),
            )))  # fmt: skip
    rows += _merge_rows(
        s,
        task_list,
        ev,
        finetunes,
        methods,
        seed=train_seed,
        progress=bar,
        reused=reused,
        costs=costs,
    )
    rows += align_rows(
        s, task_list, ev, finetunes, align_names, seed=train_seed, progress=bar, row=_row,
        row_key=lambda what: _align_key(s, task_list, trainer, what, seed=train_seed),
        load_row=load_cached_row, save_row=save_row, reused=reused, enc_params=enc_params,
        costs=costs,
    )  # fmt: skip
    rows += data_rows(
        s, task_list, ev, finetunes, data_names, seed=train_seed, progress=bar, row=_row,
        row_key=lambda what: _row_key(s, task_list, trainer, what, seed=train_seed),
        load_row=load_cached_row, save_row=save_row, reused=reused, enc_params=enc_params,
        costs=costs,
    )  # fmt: skip
    rows += moe_rows(s, task_list, ev, finetunes, moe_names, seed=train_seed, progress=bar,
                     costs=costs, reused=reused)  # fmt: skip
    rows += compress_rows(s, task_list, ev, finetunes, compress_names, seed=train_seed,
                          progress=bar, costs=costs, reused=reused)  # fmt: skip
    _finish(rows, task_list, seed=seed)
    reused = [n for n in reused if n not in in_workers]  # computed in this run, by a worker

    results = {
        "schema": report.SCHEMA_VERSION,
        "suite": s.name,
        "seed": seed,
        "train_seed": train_seed,
        "quick": quick,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tasks": [_task_entry(t) for t in task_list],
        "skipped_tasks": dict(s.skipped),
        "train_config": report.asdict_config(s.config),
        "cache": {"hits": trainer.cache_hits, "reused_rows": reused},
        "rows": rows,
        "seeds": None,
        "environment": report.environment(),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }
    return results


# ----------------------------------------------------------------------------- rows in processes

#: Rows that take longest on the text suite (measured): submitted first.
_SLOW_FIRST = ("moe:moe_train", "moe:moe_task", "data:regmean_plusplus", "data:adamerging",
               "merge:breadcrumbs", "merge:wudi", "data:fisher", "moe:moefy_top4of8",
               "compress:sparsegpt_2of4", "compress:sparsegpt_50", "compress:svd_llm_20",
               "compress:svd_llm_40")  # fmt: skip
_ROW_CONTEXT: dict[Any, dict[str, Any]] = {}


def _context(spec: tuple[Any, ...]) -> dict[str, Any]:
    """Suite, trainer (every probe, fine-tune and the multitask model read from the cache, so
    its keys and therefore the row keys are the main process's), evaluator and costs."""
    from .costs import Costs
    from .suites import TrainConfig

    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in _ROW_CONTEXT:
        name, quick, seed, task_names, config, train_seed = spec
        s = make_suite(name, quick=quick, seed=seed, tasks=task_names)
        s.config = TrainConfig(**config)
        trainer = Trainer(s, seed=train_seed)
        for t in s.tasks:
            trainer.probe(t)
        finetunes = {t.name: trainer.finetune(t) for t in s.tasks}
        trainer.multitask(s.tasks)
        _ROW_CONTEXT[key] = {
            "suite": s, "trainer": trainer, "finetunes": finetunes, "ev": Evaluator(s, trainer),
            "costs": Costs(s, trainer, s.tasks, quick=quick), "seed": train_seed,
        }  # fmt: skip
    return _ROW_CONTEXT[key]


def _row_job(spec: tuple[Any, ...], kind: str, name: str) -> str:
    """Worker process: compute one row into the row cache (one torch thread)."""
    from .data_rows import data_rows
    from .moe_rows import moe_rows

    torch.set_num_threads(1)
    c = _context(spec)
    s, trainer, tasks = c["suite"], c["trainer"], c["suite"].tasks
    bar = _progress_factory(None, False)
    common = dict(seed=c["seed"], progress=bar, costs=c["costs"])
    if kind == "merge":
        _merge_rows(s, tasks, c["ev"], c["finetunes"], [name], **common)
    elif kind == "align":
        from .scratch import align_rows

        align_rows(
            s, tasks, c["ev"], c["finetunes"], [name], row=_row,
            row_key=lambda what: _align_key(s, tasks, trainer, what, seed=c["seed"]),
            load_row=load_cached_row, save_row=save_row, reused=[],
            enc_params=s.shared_params() + sum(v.numel() for v in s.base_state().values()),
            **common,
        )  # fmt: skip
    elif kind == "compress":
        from .compress_rows import compress_rows

        compress_rows(s, tasks, c["ev"], c["finetunes"], [name], **common)
    elif kind == "data":
        data_rows(
            s, tasks, c["ev"], c["finetunes"], [name], row=_row,
            row_key=lambda what: _row_key(s, tasks, trainer, what, seed=c["seed"]),
            load_row=load_cached_row, save_row=save_row, reused=[],
            enc_params=s.shared_params() + sum(v.numel() for v in s.base_state().values()),
            **common,
        )  # fmt: skip
    else:
        moe_rows(s, tasks, c["ev"], c["finetunes"], [name], **common)
    return name


def prefill_rows(
    spec: tuple[Any, ...],
    s: Suite,
    trainer: Trainer,
    methods: list[str] | None,
    data_names: list[str],
    moe_names: list[str],
    *,
    jobs: int,
    progress: Any,
    align_names: Sequence[str] = (),
    compress_names: Sequence[str] = (),
) -> set[str]:
    """With ``jobs > 1``, compute the merge, alignment, data-aware, MoE and compression rows
    (kind ``"compress"``) missing from
    the row cache in ``jobs`` processes of one torch thread (rows are independent once the
    fine-tunes are cached; one process of one thread leaves the other cores idle); the
    run then reads them from the cache in its usual order. ``trainer`` has read every
    probe, fine-tune and the multitask model (its keys make the row keys). Returns the
    rows computed."""
    from ..merge.registry import list_methods
    from .compress_rows import compress_row_key
    from .moe_rows import moe_row_key

    if jobs <= 1:
        return set()
    tasks, seed = s.tasks, spec[-1]

    todo: list[tuple[str, str]] = []
    for name in list_methods() if methods is None else methods:
        if load_cached_row(_row_key(s, tasks, trainer, f"merge:{name}", seed=seed)) is None:
            todo.append(("merge", name))
    for name in align_names:
        if load_cached_row(_align_key(s, tasks, trainer, f"align:{name}", seed=seed)) is None:
            todo.append(("align", name))
    for name in data_names:
        if load_cached_row(_row_key(s, tasks, trainer, f"merge:{name}", seed=seed)) is None:
            todo.append(("data", name))
    for name in moe_names:
        if load_cached_row(moe_row_key(s, tasks, trainer, name, seed=seed)) is None:
            todo.append(("moe", name))
    for name in compress_names:
        if load_cached_row(compress_row_key(s, tasks, trainer, name, seed=seed)) is None:
            todo.append(("compress", name))
    return rows_in_workers(_row_job, spec, todo, _SLOW_FIRST, jobs=jobs, progress=progress)


def rows_in_workers(
    job: Callable[[tuple[Any, ...], str, str], str],
    spec: tuple[Any, ...],
    todo: list[tuple[str, str]],
    slow_first: Sequence[str],
    *,
    jobs: int,
    progress: Any,
) -> set[str]:
    """Run ``job(spec, kind, name)`` for every ``(kind, name)`` of ``todo`` in ``jobs``
    spawned processes, the ``"kind:name"`` entries of ``slow_first`` submitted first;
    returns the names the jobs returned (nothing to do in workers when fewer than two)."""
    if len(todo) < 2:
        return set()
    rank = {k: i for i, k in enumerate(slow_first)}
    todo = sorted(todo, key=lambda kn: rank.get(f"{kn[0]}:{kn[1]}", len(rank)))
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    n = min(jobs, len(todo))
    done: set[str] = set()
    with (
        progress(f"rows in {n} processes", len(todo)) as b,
        ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as pool,
    ):
        for f in as_completed([pool.submit(job, spec, k, name) for k, name in todo]):
            done.add(f.result())  # re-raises a worker's error here
            if b is not None:
                b.advance()
    return done


def _check_row_names(methods: Sequence[str] | None) -> None:
    """An unknown name among ``methods`` (alignment rows already split off) raises with every
    valid merge method, MoE row and compression row."""
    from ..errors import unknown_name
    from ..merge.registry import list_methods
    from .compress_names import COMPRESS_ROWS
    from .moe_rows import MOE_ROWS

    known = [*list_methods(data_aware=True), *MOE_ROWS, *COMPRESS_ROWS]
    for m in methods or ():
        if m not in known:
            raise unknown_name("merge method, MoE row or compression row", m, known)


def _split_data_aware(methods: list[str] | None) -> tuple[list[str] | None, list[str]]:
    """``(data-free methods or None for all of them, data-aware methods)``."""
    from ..merge.registry import get_method, list_methods

    if methods is None:
        return None, [n for n in list_methods(data_aware=True) if get_method(n).needs_data]
    names = [get_method(m).name for m in methods]
    aware = [n for n in names if get_method(n).needs_data]
    return [n for n in names if n not in aware], aware


def _task_entry(t: Task) -> dict[str, Any]:
    return {
        "name": t.name,
        "description": t.description,
        "classes": list(t.classes),
        **{f"n_{k}": len(t.splits[k]) for k in ("train", "val", "test")},
        # set by suites that know their data's origin (a Debian package and its version)
        "source": getattr(t, "source", None),
        "source_version": getattr(t, "source_version", None),
    }


def _group_skipped(skipped: dict[str, str]) -> dict[str, list[str]]:
    """Tasks skipped for the same reason (the same missing package), in task order."""
    groups: dict[str, list[str]] = {}
    for name, why in skipped.items():
        groups.setdefault(why, []).append(name)
    return groups


def _adv(b: Any) -> None:
    if b is not None:
        b.advance()


def _sum(timings: dict[str, float], *prefixes: str) -> float:
    return round(sum(v for k, v in timings.items() if k.startswith(prefixes)), 2)
