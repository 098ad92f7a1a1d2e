"""``brickwork search CONFIG OUT``: propose merge recipes, score them on Ray, keep the best.

Flow: the genome's models are read once and put in Ray's object store (as numpy arrays,
which workers map without copying); ``workers`` actors each build their evaluator once
and then merge candidates **in memory** (no checkpoint per candidate, the same plan and
executor as ``brickwork merge``) and score them on validation data. Models too large for
that (``merge_in: auto`` decides, or ``disk``) are not read by the driver: each worker
merges its candidate from the checkpoints into a temporary directory with ``brickwork
merge``'s code, reads it back and removes it. A worker that dies is
restarted by Ray and its candidate retried (``ray.max_retries``); a candidate that still
fails is logged as failed and told to the optimiser as the worst score.

Everything lands in ``OUT`` as it happens: ``config.yml`` (the resolved configuration),
``search.jsonl`` (append-only: every candidate's point, recipe, score and timings),
``optimizer.json`` (the optimiser's state after each batch). ``--resume`` replays the log
through a fresh seeded optimiser (checking each proposed point against the logged one),
scores only what the log lacks, and so reaches the same result as an uninterrupted run.
At the end: ``best.yml`` (``brickwork merge best.yml DIR`` rebuilds the best candidate),
``report.json`` / ``report.md`` (best recipe, validation score, then, read once, the test
score for bench evaluators), ``scores.png`` (score against evaluations).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import BrickworkError, OutputExistsError, RecipeError
from .config import SearchConfig, load_search_config, parse_search_config
from .evaluators import bench_ref, make_evaluator
from .genome import Genome
from .optimizers import make_optimizer

LOG = "search.jsonl"


@dataclass
class SearchResult:
    out: Path
    best: dict[str, Any]  # the best log record
    evaluations: int
    records: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- models


def _export_bench_models(models: list[str], spec: Any, out: Path) -> dict[str, str]:
    """``bench:SUITE/TASK`` references -> model directories under ``OUT/models`` (the
    bench's cached fine-tunes, trained on a miss; ``bench:SUITE/base``: the base)."""
    refs = {m: bench_ref(m) for m in models}
    wanted = {m: r for m, r in refs.items() if r is not None}
    if not wanted:
        return {}
    suites = {s for s, _ in wanted.values()}
    if len(suites) > 1 or suites != {spec.suite}:
        raise RecipeError(
            f"genome models {sorted(wanted)} must come from one bench suite, the evaluator's "
            f"suite '{spec.suite}'"
        )
    from ..checkpoint.reader import TensorInfo
    from ..checkpoint.writer import CheckpointWriter

    tasks = [t for _, t in wanted.values() if t != "base"]
    sources: dict[str, tuple[Callable[[], dict[str, Any]], Path | None]] = {}
    if spec.suite == "lm":
        from .evaluators import lm_bench

        lm, _, _ = lm_bench(spec.quick, tasks or None)
        keys = {"base": lm.base_key, **lm.keys}
        for m, (_, task) in wanted.items():
            if task not in keys:
                raise RecipeError(f"model {m!r}: the lm suite has no domain '{task}'")
            sources[m] = (lambda k=keys[task]: lm.state(k), lm.dir(keys[task]))
    else:
        from ..bench.suites import make_suite
        from ..bench.train import Trainer, full_state

        suite = make_suite(spec.suite, quick=spec.quick, seed=0, tasks=tasks or None)
        trainer = Trainer(suite, seed=spec.train_seed)
        by_name = {t.name: t for t in suite.tasks}
        for m, (_, task) in wanted.items():
            if task == "base":
                sources[m] = (suite.base_state, None)
            elif task in by_name:
                sources[m] = (lambda t=by_name[task]: full_state(suite, trainer.finetune(t)[0]),
                              None)  # fmt: skip
            else:
                raise RecipeError(f"model {m!r}: suite {spec.suite} has no task '{task}'")
    paths = {}
    for m, (_, task) in wanted.items():
        d = out / "models" / task
        paths[m] = str(d.absolute())
        if (d / "model.safetensors").is_file():
            continue
        read, side = sources[m]
        state = read()
        infos = [TensorInfo(k, tuple(v.shape), v.dtype) for k, v in state.items()]
        with CheckpointWriter(d, infos, side_files=side, say=lambda _m: None) as w:
            for k, v in state.items():
                w.write(k, v.contiguous())
    return paths


def _resolve(cfg: SearchConfig, out: Path, base_dir: Path | None) -> tuple[SearchConfig, Any]:
    """The config with every model reference made an absolute path (bench references
    exported), plus the bench references as written."""
    g = cfg.genome
    written = [*g.models, *([g.base_model] if g.base_model else [])]
    bench = _export_bench_models(written, cfg.evaluator, out)

    def fix(p: str) -> str:
        if p in bench:
            return bench[p]
        q = Path(p).expanduser()
        if not q.exists() and base_dir is not None and (base_dir / q).exists():
            q = base_dir / q
        if not q.exists():
            raise RecipeError(f"genome model {p}: no such file or directory")
        return str(q.absolute())

    genome = g.model_copy(
        update={
            "models": [fix(m) for m in g.models],
            "base_model": fix(g.base_model) if g.base_model else None,
        }  # fmt: skip
    )
    return cfg.model_copy(update={"genome": genome}), written


def _read_models(paths: list[str]) -> tuple[dict[str, dict[str, Any]], int, list[int]]:
    """Every model's tensors as numpy arrays (bfloat16 as int16 bits), the layer count and
    the layer indices the first checkpoint holds."""
    import torch

    from ..arch.names import layer_name, num_layers
    from ..checkpoint.reader import open_checkpoint

    out, layers, present = {}, 0, []
    for i, p in enumerate(paths):
        ck = open_checkpoint(p)
        if i == 0:
            layers = num_layers(ck.names, ck.config)
            present = sorted({ln.index for n in ck.names if (ln := layer_name(n)) is not None})
        arrays = {}
        for n in ck.names:
            t = ck.get(n).contiguous()
            arrays[n] = ("bf16", t.view(torch.int16).numpy()) if t.dtype == torch.bfloat16 else (
                "", t.numpy())  # fmt: skip
        out[p] = arrays
    return out, layers, present


def _layout(path: str) -> tuple[int, list[int]]:
    """The layer count and the layer indices of one checkpoint, without reading tensors."""
    from ..arch.names import layer_name, num_layers
    from ..checkpoint.reader import open_checkpoint

    ck = open_checkpoint(path)
    present = sorted({ln.index for n in ck.names if (ln := layer_name(n)) is not None})
    return num_layers(ck.names, ck.config), present


def _checkpoint_bytes(path: str) -> int:
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.iterdir() if f.suffix in
                                     (".safetensors", ".bin", ".pt", ".pth")]  # fmt: skip
    return sum(f.stat().st_size for f in files)


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _merge_mode(cfg: SearchConfig, paths: list[str], workers: int) -> str:
    """``memory`` or ``disk`` (see ``SearchConfig.merge_in``)."""
    if cfg.merge_in != "auto":
        return cfg.merge_in
    sizes = [_checkpoint_bytes(p) for p in paths]
    return "memory" if sum(sizes) + workers * max(sizes) <= 0.5 * _available_bytes() else "disk"


def _merge_on_disk(recipe: dict[str, Any]) -> dict[str, Any]:
    """Merge ``recipe`` from the checkpoints on disk into a temporary directory (the same
    code as ``brickwork merge``) and read the result back; the directory is removed."""
    import tempfile

    from ..checkpoint.reader import open_checkpoint
    from ..merge.api import merge

    with tempfile.TemporaryDirectory(prefix="brickwork-search-") as tmp:
        d = merge(recipe, Path(tmp) / "merged", progress=False)
        ck = open_checkpoint(d)
        return {n: ck.get(n) for n in ck.names}


def _vm_data_mb() -> float:
    """The process's data segment (heap and private mappings: what RLIMIT_DATA bounds), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _tensors(arrays: Mapping[str, Any]) -> dict[str, Any]:
    import warnings

    import torch

    out = {}
    with warnings.catch_warnings():  # object-store arrays are read-only; merges never write
        warnings.simplefilter("ignore", UserWarning)
        for n, (kind, a) in arrays.items():
            t = torch.from_numpy(a)
            out[n] = t.view(torch.bfloat16) if kind == "bf16" else t
    return out


# ----------------------------------------------------------------------------- workers


class _Worker:
    """One Ray actor: the models (from the object store), an evaluator, one torch thread.
    Set up lazily from the arguments of its calls, so a restarted actor (a new process)
    sets itself up again on its first candidate."""

    def __init__(self, threads: int, memory_limit: int | None = None) -> None:
        import torch

        torch.set_num_threads(threads)
        self.ckpts: dict[str, Any] | None = None  # None until set up
        self.on_disk = False  # merge_in: disk (no models held)
        self.evaluator: Any = None
        self.memory_limit = memory_limit
        if memory_limit is not None:  # ray.memory_per_worker: a hard bound, not only Ray's
            import resource

            _, hard = resource.getrlimit(resource.RLIMIT_DATA)
            soft = memory_limit if hard == resource.RLIM_INFINITY else min(memory_limit, hard)
            resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))

    def _too_big(self, e: BaseException) -> bool:
        """An allocation refused under ``memory_limit`` (numpy: MemoryError; torch: a
        RuntimeError of its allocator)."""
        return self.memory_limit is not None and (
            isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "allocate" in str(e))
        )

    def setup(self, models: list[Any], evaluator: Any) -> BaseException | None:
        """Read the models (``models[0]``: their object-store reference) and set up the
        evaluator; returns the error instead of raising it, so the driver shows it."""
        if self.ckpts is not None:
            return None
        import ray

        from ..checkpoint.reader import StateDictCheckpoint

        try:
            evaluator.setup()
        except BaseException as e:
            if self._too_big(e):
                return RecipeError(
                    f"ray.memory_per_worker = {self.memory_limit / 1e9:.2f} GB: a worker cannot "
                    f"set up its evaluator within it ({str(e).splitlines()[0][:200]}); raise it "
                    f"(a worker's VmData is now {_vm_data_mb():.0f} MB)"
                )
            return e
        mode, arrays = ray.get(models[0])  # the object store's copy, shared by every worker
        self.on_disk = mode == "disk"
        self.ckpts = {} if self.on_disk else {
            p: StateDictCheckpoint(_tensors(a), label=p) for p, a in arrays.items()}  # fmt: skip
        self.evaluator = evaluator
        return None

    def run(
        self, i: int, recipe: dict[str, Any], models: list[Any], evaluator: Any
    ) -> dict[str, Any]:
        from ..merge.api import merge_recipe_in_memory

        err = self.setup(models, evaluator)
        if err is not None:
            raise err
        t0 = time.perf_counter()
        try:
            if self.on_disk:
                state = _merge_on_disk(recipe)
            else:
                state = merge_recipe_in_memory(recipe, self.ckpts)
            t1 = time.perf_counter()
            score = self.evaluator.score(state)
            t2 = time.perf_counter()
        except (MemoryError, RuntimeError) as e:
            if not self._too_big(e):
                raise
            import gc

            gc.collect()
            return {"i": i, "score": None, "status": "failed", "pid": os.getpid(),
                    "error": f"the candidate needs more than ray.memory_per_worker = "
                    f"{self.memory_limit / 1e9:.2f} GB ({str(e).splitlines()[0][:200]})"}  # fmt: skip
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        return {"i": i, "score": float(score), "merge_s": round(t1 - t0, 4),
                "eval_s": round(t2 - t1, 4), "pid": os.getpid(),
                "worker_peak_rss_mb": round(peak_mb, 1),
                "worker_vm_data_mb": round(_vm_data_mb(), 1)}  # fmt: skip


def _start_ray(
    cfg: SearchConfig, address: str | None, workers: int | None
) -> tuple[Any, int, bool]:
    try:
        import ray
    except ImportError:
        raise RecipeError(
            "brickwork search runs on Ray, which is not installed: pip install 'brickwork[search]'"
        ) from None
    address = address or cfg.ray.address
    started = False
    if not ray.is_initialized():
        n = workers or cfg.ray.workers or (os.cpu_count() or 1)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, private cluster
        kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                  configure_logging=False)  # fmt: skip
        if address is None:
            kw["num_cpus"] = n
        try:
            ray.init(address=address, **kw)
        except ConnectionError as e:
            raise RecipeError(
                f"--ray-address {address}: cannot join the Ray cluster ({e})"
            ) from None
        started = True
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return ray, max(1, workers or cfg.ray.workers or cpus), started


# ----------------------------------------------------------------------------- log


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for k, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if k == len(path.read_text().splitlines()) - 1:
                break  # a line cut by a kill: scored again
            raise RecipeError(f"{path}: line {k + 1} is not JSON; the log is damaged") from None
    return records


def _same_config(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = ("genome", "evaluator", "optimizer", "seed")
    return [k for k in keys if stored.get(k) != now.get(k)]


# ----------------------------------------------------------------------------- search


def run_search(
    config: SearchConfig | Mapping[str, Any] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    max_evals: int | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    test: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> SearchResult:
    """Run (or, with ``resume``, continue) the search of ``config`` into directory ``out``."""
    base_dir = None
    if isinstance(config, str | os.PathLike):
        base_dir = Path(config).parent
        cfg = load_search_config(config)
    elif isinstance(config, SearchConfig):
        cfg = config
    else:
        cfg = parse_search_config(dict(config))
    if max_evals is not None:
        cfg = cfg.model_copy(update={"max_evals": max_evals})
    out = Path(out)
    log_path = out / LOG
    if resume and not log_path.is_file():
        raise RecipeError(f"{out}: --resume, but there is no {LOG} to continue; run without it")
    if not resume and out.exists() and any(out.iterdir()):
        raise OutputExistsError(
            f"{out}: already holds a search; pass --resume to continue it, or choose another OUT"
        )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _search(cfg, out, base_dir, resume=resume, ray_address=ray_address,
                       workers=workers, progress=progress, test=test, on_record=on_record)  # fmt: skip
    except BaseException:
        log = out / LOG
        scored = log.is_file() and log.stat().st_size > 0
        if created and not scored:  # nothing was scored: leave nothing behind
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise


def _search(cfg: SearchConfig, out: Path, base_dir: Path | None, *, resume: bool,
            ray_address: str | None, workers: int | None, progress: bool, test: bool,
            on_record: Callable[[dict[str, Any]], None] | None) -> SearchResult:  # fmt: skip
    log_path = out / LOG
    cfg, written = _resolve(cfg, out, base_dir)
    now = cfg.model_dump(mode="json")
    stored_path = out / "config.yml"
    if resume and stored_path.is_file():
        diff = _same_config(yaml.safe_load(stored_path.read_text()) or {}, now)
        if diff:
            raise RecipeError(
                f"{out}: --resume with a config whose {', '.join(diff)} differ from the search "
                f"in {stored_path}; resume with the same config (only max_evals may change)"
            )
    stored_path.write_text(yaml.safe_dump(now, sort_keys=False))

    g = cfg.genome
    paths = list(dict.fromkeys([*([g.base_model] if g.base_model else []), *g.models]))
    mode = _merge_mode(cfg, paths, workers or cfg.ray.workers or (os.cpu_count() or 1))
    if mode == "memory":
        arrays, n_layers, present = _read_models(paths)
    else:  # each worker merges from the checkpoints: nothing read here
        arrays, (n_layers, present) = None, _layout(paths[0])
    genome = Genome(g, n_layers, present)
    opt = make_optimizer(cfg.optimizer, genome.dims, genome.x0())
    reference = g.base_model or g.models[0]
    evaluator = make_evaluator(cfg.evaluator, reference=reference, models=written,
                               base_dir=base_dir)  # fmt: skip
    done = {r["i"]: r for r in _read_log(log_path) if "i" in r}

    ray, n_workers, started = _start_ray(cfg, ray_address, workers)
    t_start, timing = time.perf_counter(), {"setup_s": 0.0, "scored": 0}
    try:
        records = _loop(ray, cfg, genome, opt, arrays, evaluator, n_workers, done, out, timing,
                        progress=progress, on_record=on_record)  # fmt: skip
    finally:
        if started:
            ray.shutdown()
    wall = time.perf_counter() - t_start
    return _finish(cfg, genome, arrays, evaluator, records, out, wall=wall,
                   setup=timing["setup_s"], scored=timing["scored"], workers=n_workers,
                   test=test, mode=mode)  # fmt: skip


def _loop(ray: Any, cfg: SearchConfig, genome: Genome, opt: Any, arrays: Any, evaluator: Any,
          n_workers: int, done: dict[int, dict[str, Any]], out: Path, timing: dict[str, float],
          *, progress: bool,
          on_record: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:  # fmt: skip
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

    log = (out / LOG).open("a")
    models_ref = ray.put(("disk", None) if arrays is None else ("memory", arrays))
    retries = cfg.ray.max_retries
    actor_cls = ray.remote(max_restarts=retries, max_task_retries=retries)(_Worker)
    opts: dict[str, Any] = {"num_cpus": 1}
    if cfg.ray.memory_per_worker is not None:
        from ..checkpoint.writer import parse_size

        opts["memory"] = parse_size(cfg.ray.memory_per_worker)

    def new_actors(n: int) -> list[Any]:  # set up side by side, not one after another
        acts = [actor_cls.options(**opts).remote(1, opts.get("memory")) for _ in range(n)]
        for err in ray.get([a.setup.remote([models_ref], evaluator) for a in acts]):
            if err is not None:
                raise err
        return acts

    t0 = time.perf_counter()
    actors = new_actors(n_workers)
    timing["setup_s"] = time.perf_counter() - t0
    records = [done[i] for i in sorted(done)]
    best = max((r["score"] for r in records if r.get("score") is not None), default=None)
    bar = _Bar(progress, cfg.max_evals, len(done), best)
    batch_no = 0
    try:
        while batch_no * opt.batch < cfg.max_evals:
            xs = opt.ask()
            first = batch_no * opt.batch
            ids = [first + j for j in range(len(xs)) if first + j < cfg.max_evals]
            for i in ids:
                if (
                    i in done
                    and max(abs(a - b) for a, b in zip(done[i]["x"], xs[i - first])) > 1e-9
                ):
                    raise RecipeError(
                        f"{out / LOG}: candidate {i} in the log is not the point this config "
                        "proposes now (another seed, optimiser or genome?); resume with the "
                        "search's own config"
                    )
            todo = [i for i in ids if i not in done]
            recipes = {i: genome.recipe(xs[i - first], seed=cfg.seed) for i in todo}
            running: dict[Any, tuple[int, int, float]] = {}
            free = list(range(len(actors)))
            queue = list(todo)
            while queue or running:
                while queue and free:
                    i, k = queue.pop(0), free.pop(0)
                    f = actors[k].run.remote(i, recipes[i], [models_ref], evaluator)
                    running[f] = (i, k, time.perf_counter())
                ready, _ = ray.wait(list(running), num_returns=1)
                f = ready[0]
                i, k, t0 = running.pop(f)
                rec = {"i": i, "batch": batch_no, "x": xs[i - first], "recipe": recipes[i]}
                try:
                    res = ray.get(f)
                    rec |= {"status": "ok", **res}
                except RayTaskError as e:
                    cause = e.as_instanceof_cause()
                    if isinstance(cause, BrickworkError):
                        raise cause from None
                    raise
                except (RayActorError, WorkerCrashedError) as e:
                    rec |= {"status": "failed", "score": None,
                            "error": str(e).splitlines()[0][:300]}  # fmt: skip
                    actors[k] = new_actors(1)[0]  # the worker is gone for good: a fresh one
                rec["wall_s"] = round(time.perf_counter() - t0, 4)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                done[i] = rec
                records.append(rec)
                timing["scored"] += 1
                if rec.get("score") is not None and (best is None or rec["score"] > best):
                    best = rec["score"]
                bar.advance(best)
                if on_record is not None:
                    on_record(rec)
                free.append(k)
            if len(ids) < len(xs):
                break  # max_evals within this batch: nothing to tell
            opt.tell(xs, [done[i].get("score") for i in ids])
            (out / "optimizer.json").write_text(json.dumps(opt.state(), indent=1) + "\n")
            batch_no += 1
    finally:
        bar.close()
        log.close()
    return sorted(records, key=lambda r: r["i"])


class _Bar:
    """A rich progress bar with the best score so far (nothing when ``progress`` is off)."""

    def __init__(self, on: bool, total: int, completed: int, best: float | None) -> None:
        self.p = None
        if not on:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.p = Progress("[progress.description]{task.description}", BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn())  # fmt: skip
        self.p.start()
        self.task = self.p.add_task(self._text(best), total=total, completed=completed)

    @staticmethod
    def _text(best: float | None) -> str:
        return "search: best " + ("-" if best is None else f"{best:.4f}")

    def advance(self, best: float | None) -> None:
        if self.p is not None:
            self.p.update(self.task, advance=1, description=self._text(best))

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()


# ----------------------------------------------------------------------------- report


def _finish(cfg: SearchConfig, genome: Genome, arrays: Any, evaluator: Any,
            records: list[dict[str, Any]], out: Path, *, wall: float, setup: float, scored: int,
            workers: int,
            test: bool, mode: str) -> SearchResult:  # fmt: skip
    ok = [r for r in records if r.get("score") is not None]
    if not ok:
        raise BrickworkError(f"{out}: no candidate was scored (see {out / LOG})")
    best = max(ok, key=lambda r: (r["score"], -r["i"]))
    (out / "best.yml").write_text(
        f"# brickwork search: candidate {best['i']}, validation score {best['score']:.6f}\n"
        + yaml.safe_dump(best["recipe"], sort_keys=False)
    )
    test_res = None
    from .evaluators import Evaluator

    if test and type(evaluator).test is not Evaluator.test:  # only bench evaluators have one
        from ..checkpoint.reader import StateDictCheckpoint
        from ..merge.api import merge_recipe_in_memory

        if arrays is None:
            state = _merge_on_disk(best["recipe"])
        else:
            ckpts = {p: StateDictCheckpoint(_tensors(a), label=p) for p, a in arrays.items()}
            state = merge_recipe_in_memory(best["recipe"], ckpts)
        evaluator.setup()
        test_res = evaluator.test(state)
    run = [r for r in records if "merge_s" in r]
    per = {
        "merge_s": _mean([r["merge_s"] for r in run]),
        "eval_s": _mean([r["eval_s"] for r in run]),
        "wall_s": _mean([r["wall_s"] for r in run]),
    }
    if per["wall_s"] is not None:
        per["ray_s"] = round(per["wall_s"] - per["merge_s"] - per["eval_s"], 4)
    rss = [r["worker_peak_rss_mb"] for r in run if "worker_peak_rss_mb" in r]
    per["worker_peak_rss_mb"] = max(rss) if rss else None  # the largest of any worker
    report = {
        "best": {"candidate": best["i"], "validation": best["score"], "recipe": "best.yml"},
        "test": None if test_res is None else {k: v for k, v in test_res.items() if k != "correct"},
        "evaluations": len(records),
        "failed": len(records) - len(ok),
        "workers": workers,
        "merge_in": mode,
        "wall_seconds_this_run": round(wall, 2),
        "evaluations_this_run": scored,
        "evaluations_per_minute_this_run": round(scored / wall * 60, 2) if wall > 0 and scored else None,
        "worker_setup_seconds_this_run": round(setup, 2),
        "evaluations_per_minute_after_setup": round(scored / (wall - setup) * 60, 2)
        if wall > setup and scored else None,
        "per_candidate": per,
        "optimizer": cfg.optimizer.model_dump(),
        "genes": genome.dims,
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report, best, genome))
    _plot(records, out / "scores.png")
    return SearchResult(out, best, len(records), records, test_res, report)


def _mean(v: list[float]) -> float | None:
    return round(sum(v) / len(v), 4) if v else None


def _markdown(report: dict[str, Any], best: dict[str, Any], genome: Genome) -> str:
    lines = ["# brickwork search", "",
             f"- evaluations: {report['evaluations']} ({report['failed']} failed), "
             f"{report['workers']} worker(s)",
             f"- best: candidate {best['i']}, validation {best['score']:.4f} (`best.yml`)"]  # fmt: skip
    if report["test"]:
        t = report["test"]
        lo, hi = t["interval"]
        lines.append(f"- test (read once, at the end): normalized {t['normalized']:.4f} "
                     f"[{lo:.4f}, {hi:.4f}]")  # fmt: skip
    lines += ["", "| gene | value |", "|---|---:|"]
    for lab, gene, x in zip(genome.labels(), genome.genes, best["x"]):
        lines.append(f"| {lab} | {gene.value(x):.4f} |")
    return "\n".join(lines) + "\n"


def _plot(records: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra is not installed: no picture
        return
    xs = [r["i"] + 1 for r in records if r.get("score") is not None]
    ys = [r["score"] for r in records if r.get("score") is not None]
    run, best = [], float("-inf")
    for y in ys:
        best = max(best, y)
        run.append(best)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(xs, ys, s=10, alpha=0.6, label="candidate")
    ax.plot(xs, run, color="C3", label="best so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("validation score")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
