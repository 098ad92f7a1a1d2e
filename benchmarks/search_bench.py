"""Search on the text and lm suites: per-layer merge coefficients found by ``brickwork
search`` against the best grid-tuned data-free row of ``brickwork bench``.

    .venv/bin/brickwork bench --suite text --out /tmp/bench-text        # the grid rows
    .venv/bin/python benchmarks/search_bench.py --bench /tmp/bench-text/results.json \\
        --method ties --evals 200
    .venv/bin/python benchmarks/search_bench.py --bench ... --scaling 24  # 1 vs 2 workers
    .venv/bin/brickwork bench --suite lm --out /tmp/bench-lm
    .venv/bin/python benchmarks/search_bench.py --bench /tmp/bench-lm/results.json --method ties

On the lm suite the score is the mean over domains of the share of each fine-tune's loss
gain kept (validation sequences during the search, test once at the end), and the grid
row is rebuilt from the bench's own ``recipes/<row>.yaml`` and scored on the same test
sequences for the paired bootstrap.

The search's models are the bench's own fine-tunes (``bench:text/<task>``, the same cache,
seed and splits as the bench run); its score is the mean over tasks of validation accuracy
/ the fine-tune's validation accuracy; the test split is read once, for the best
candidate, at the end. The comparison with the grid row is a paired bootstrap on the same
test examples (``brickwork.bench.stats``: 1,000 resamples within each task, the
fine-tunes' accuracies resampled too): the difference of normalized accuracy, its 95 %
interval, and whether the interval lies above +2 points (the issue's goal).

``--scaling N``: N evaluations of the same search with 1 and with 2 Ray workers, in one
run: evaluations per minute of each and their ratio, and the per-candidate split into
merge, evaluation and Ray's share (the wall time per candidate seen by the driver minus
the worker's merge + evaluation).

Results: ``benchmarks/results/search_<suite>_<method>.json`` (+ ``.png``, the score curve),
``benchmarks/results/search_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

PARAMS = {"ties": ["weight", "density"], "task_arithmetic": ["weight"],
          "dare_ties": ["weight", "density"], "tsv_m": ["alpha"], "iso_c": ["alpha"]}  # fmt: skip


def _correct(row: dict[str, Any]) -> dict[str, np.ndarray]:
    return {t: np.array([c == "1" for c in s], dtype=bool) for t, s in row["correct"].items()}


def best_grid_row(results: dict[str, Any]) -> dict[str, Any]:
    """The data-free merge row with the highest normalized test accuracy."""
    from brickwork.merge.registry import get_method, list_methods

    free = {m for m in list_methods() if not get_method(m).needs_data}
    rows = [r for r in results["rows"] if r["kind"] == "merge" and r["method"] in free
            and r["status"] == "ok"]  # fmt: skip
    return max(rows, key=lambda r: r["normalized"])


def search_config(tasks: list[str], method: str, evals: int, workers: int, *,
                  granularity: int, seed: int, quick: bool, suite: str = "text",
                  params: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    genome: dict[str, Any] = {
        "merge_method": method,
        "base_model": f"bench:{suite}/base",
        "models": [f"bench:{suite}/{t}" for t in tasks],
        "layer_granularity": granularity,
        "parameters": params or PARAMS[method],
    }
    if method == "task_arithmetic" and "lambda" not in genome["parameters"]:
        genome["fixed"] = {"lambda": 1.0}
    return {
        "genome": genome,
        "evaluator": {"bench_task": "all", "suite": suite, "quick": quick},
        "optimizer": {"name": "cma", "seed": seed},
        "max_evals": evals,
        "ray": {"workers": workers},
    }


def compare(search_test: dict[str, Any], grid: dict[str, Any], individual: dict[str, Any]):
    from brickwork.bench import stats as S

    ours = {t: np.asarray(v, dtype=bool) for t, v in search_test["correct"].items()}
    theirs, ft = _correct(grid), _correct(individual)
    boot = S.Bootstrap({t: len(v) for t, v in ft.items()})
    ref = boot.means(ft)
    a = S.normalized_accuracy(boot.means(ours), ref)
    b = S.normalized_accuracy(boot.means(theirs), ref)
    lo, hi = S.interval(a - b)
    return {"difference": round(float(np.mean(a - b)), 6), "interval": [round(lo, 6), round(hi, 6)],
            "verdict": S.compare(a, b), "goal_2_points": bool(lo > 0.02)}  # fmt: skip


def compare_lm(search_test: dict[str, Any], grid: dict[str, Any], bench_dir: Path,
               quick: bool) -> dict[str, Any]:  # fmt: skip
    """The lm suite: the grid row rebuilt from the bench's own recipe (``recipes/<row>.yaml``)
    and scored on the same test sequences; paired bootstrap of the gain kept."""
    from brickwork.bench import stats as S
    from brickwork.merge.api import merge
    from brickwork.search.evaluators import lm_bench

    domains = list(search_test["losses"])
    models, _, ev = lm_bench(quick, domains)
    with tempfile.TemporaryDirectory() as tmp:
        merged = merge(bench_dir / "recipes" / f"{grid['method']}.yaml", Path(tmp) / "m",
                       progress=False)  # fmt: skip
        from transformers import AutoModelForCausalLM

        theirs = ev.losses(AutoModelForCausalLM.from_pretrained(str(merged)), "test", domains)
    base = ev.losses(models.load(models.base_key), "test", domains)
    ft = {}
    for d in domains:
        ft |= ev.losses(models.load(models.keys[d]), "test", [d])
    ours = {d: np.asarray(v) for d, v in search_test["losses"].items()}
    boot = S.Bootstrap({d: len(v) for d, v in ours.items()})
    bm, fm = boot.means(base), boot.means(ft)
    a = S.loss_gain_kept(boot.means(ours), bm, fm)
    b = S.loss_gain_kept(boot.means(theirs), bm, fm)
    lo, hi = S.interval(a - b)
    return {"difference": round(float(np.mean(a - b)), 6), "interval": [round(lo, 6), round(hi, 6)],
            "verdict": S.compare(a, b), "goal_2_points": bool(lo > 0.02),
            "grid_rebuilt_test_losses": {d: round(float(np.mean(v)), 5) for d, v in theirs.items()}}  # fmt: skip


def run_one(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    from brickwork.search import run_search

    tasks = [t["name"] for t in results["tasks"]]
    grid = best_grid_row(results)
    individual = next(r for r in results["rows"] if r["method"] == "individual")
    suite = results["suite"]
    out = Path(args.out or tempfile.mkdtemp(prefix=f"search-{suite}-"))
    cfg = search_config(tasks, args.method, args.evals, args.workers, suite=suite, params=args.params,
                        granularity=args.granularity, seed=args.seed, quick=results["quick"])  # fmt: skip
    t0 = time.perf_counter()
    res = run_search(cfg, out, resume=(out / "search.jsonl").is_file(), progress=True)
    wall = time.perf_counter() - t0
    same = next((r for r in results["rows"] if r["kind"] == "merge" and r["status"] == "ok"
                 and r["method"] == args.method), None)  # fmt: skip
    if suite == "lm":
        cmp = compare_lm(res.test, grid, Path(args.bench).parent, results["quick"])
        cmp_same = same and compare_lm(res.test, same, Path(args.bench).parent, results["quick"])
    else:  # the search's test score must be on the bench's own fine-tunes and test examples
        ft = _correct(individual)
        for t, v in res.test["correct"].items():
            assert len(v) == len(ft[t]), f"task {t}: test sizes differ from the bench run"
        cmp = compare(res.test, grid, individual)
        cmp_same = same and compare(res.test, same, individual)
    curve, best = [], float("-inf")
    for r in res.records:
        if r.get("score") is not None:
            best = max(best, r["score"])
        curve.append(round(best, 6))
    out_json = {
        "command": f"benchmarks/search_bench.py --bench {suite}/results.json --method "
        f"{args.method} --evals {args.evals} --granularity {args.granularity}"
        + (f" --params {','.join(args.params)}" if args.params else ""),
        "parameters": args.params or PARAMS[args.method],
        "suite": suite,
        "granularity": args.granularity,
        "load_1min_at_end": round(os.getloadavg()[0], 2),
        "method": args.method,
        "genes": res.report["genes"],
        "evaluations": res.evaluations,
        "workers": args.workers,
        "wall_seconds": round(wall, 1),
        "per_candidate": res.report["per_candidate"],
        "best_candidate": res.best["i"],
        "search_validation": round(res.best["score"], 6),
        "search_test_normalized": res.test["normalized"],
        "search_test_interval": res.test["interval"],
        "grid_row": {
            "method": grid["method"],
            "normalized": grid["normalized"],
            "normalized_ci": grid["normalized_ci"],
            "hyperparameters": grid["hyperparameters"],
        },  # fmt: skip
        "vs_grid": cmp,
        "same_method_grid_row": same
        and {
            "normalized": same["normalized"],
            "normalized_ci": same["normalized_ci"],
            "hyperparameters": same["hyperparameters"],
        },
        "vs_same_method_grid": cmp_same,
        "best_so_far": curve,
        "search_out": str(out),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = (
        f"search_{suite}_{args.method}"
        + ("" if args.granularity == 1 else f"_g{args.granularity}")
        + ("" if not args.params else "_" + "_".join(args.params))
    )
    (RESULTS / f"{stem}.json").write_text(json.dumps(out_json, indent=1) + "\n")
    if (out / "scores.png").is_file():
        shutil.copy(out / "scores.png", RESULTS / f"{stem}.png")
    print(
        f"search ({args.method}, {res.evaluations} evals, {wall:.0f} s): validation "
        f"{res.best['score']:.4f}, test normalized {res.test['normalized']:.4f} "
        f"{res.test['interval']}"
    )
    print(
        f"best grid row {grid['method']}: test normalized {grid['normalized']:.4f} "
        f"{grid['normalized_ci']}"
    )
    print(
        f"search - grid: {cmp['difference']:+.4f} {cmp['interval']} ({cmp['verdict']}); "
        f"goal >= +2 points under the paired bootstrap: {cmp['goal_2_points']}"
    )
    if cmp_same:
        print(
            f"search - grid row of {args.method} ({same['normalized']:.4f}): "
            f"{cmp_same['difference']:+.4f} {cmp_same['interval']} ({cmp_same['verdict']})"
        )
    return out_json


def scaling(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    from brickwork.search import run_search

    tasks = [t["name"] for t in results["tasks"]]
    rows = {}
    for workers in (1, 2):
        out = Path(tempfile.mkdtemp(prefix=f"search-scaling-{workers}-"))
        cfg = search_config(tasks, args.method, args.scaling, workers,
                            granularity=args.granularity, seed=args.seed, quick=results["quick"])  # fmt: skip
        res = run_search(cfg, out, progress=False, test=False)
        r = res.report
        rows[workers] = {"evaluations_per_minute": r["evaluations_per_minute_this_run"],
                         "evaluations_per_minute_after_setup":
                             r["evaluations_per_minute_after_setup"],
                         "wall_seconds": r["wall_seconds_this_run"],
                         "worker_setup_seconds": r["worker_setup_seconds_this_run"],
                         "per_candidate": r["per_candidate"]}  # fmt: skip
        print(
            f"{workers} worker(s): {r['evaluations_per_minute_this_run']} evaluations/min "
            f"({r['evaluations_per_minute_after_setup']} after the workers' "
            f"{r['worker_setup_seconds_this_run']} s set-up), per candidate {r['per_candidate']}"
        )
    ratio = rows[2]["evaluations_per_minute"] / rows[1]["evaluations_per_minute"]
    steady = (rows[2]["evaluations_per_minute_after_setup"]
              / rows[1]["evaluations_per_minute_after_setup"])  # fmt: skip
    print(f"2 vs 1 workers: x{ratio:.2f} (goal >= 1.7); after set-up x{steady:.2f}")
    out_json = {"command": f"benchmarks/search_bench.py --scaling {args.scaling}",
                "method": args.method, "evaluations": args.scaling, "rows": rows,
                "ratio_2_vs_1": round(ratio, 3), "ratio_after_setup": round(steady, 3),
                "load_1min_at_end": round(os.getloadavg()[0], 2)}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search_scaling.json").write_text(json.dumps(out_json, indent=1) + "\n")
    return out_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", required=True, help="results.json of brickwork bench --suite text")
    ap.add_argument("--method", default="ties", choices=sorted(PARAMS))
    ap.add_argument("--evals", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--granularity", type=int, default=1)
    ap.add_argument("--params", type=lambda v: v.split(","), default=None,
                    help="searched parameters, comma-separated (default: see PARAMS)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="search output folder (resumed if it has a log)")
    ap.add_argument("--scaling", type=int, default=0, help="measure 1 vs 2 workers on N evals")
    args = ap.parse_args()
    results = json.loads(Path(args.bench).read_text())
    if results["suite"] not in ("text", "lm"):
        raise SystemExit(f"{args.bench}: a text or lm suite results.json is expected")
    if args.scaling:
        scaling(args, results)
    else:
        run_one(args, results)


if __name__ == "__main__":
    main()
