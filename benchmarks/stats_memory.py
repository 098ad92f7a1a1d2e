"""Statistics step and data-aware merge of the merge benchmark's 0.5B Llama: time and memory.

Issue 10, "Memory and speed": (1) wall time and peak RSS of brickwork's statistics step (the
input Gram matrices RegMean needs, ``brickwork.statistics_for`` as ``brickwork merge`` calls
it for a recipe's ``data:`` block) on calibration sequences of 512 tokens, at several numbers
of sequences; (2) peak RSS of ``brickwork merge`` with method ``regmean`` (statistics read
from the cache, so only the merge is measured) against ``linear`` on the same three
fine-tunes. The checkpoints are merge_vs_mergekit.py's (same builder, same cache).

    .venv/bin/python benchmarks/stats_memory.py                 # stats ft1:8,ft1:32 + merges
    .venv/bin/python benchmarks/stats_memory.py --size tiny --stats ft1:8,ft2:8,ft3:8  # smoke
    .venv/bin/python benchmarks/stats_memory.py --stats "" --trace   # merges only, + VmHWM
    .venv/bin/python benchmarks/stats_memory.py --stats "" --no-merge --profile-sequences 2

The merges need every fine-tune's statistics on ``--merge-n`` sequences in the cache (run
``--stats ft1:8,ft2:8,ft3:8`` once); otherwise the regmean merge would compute them and the
run stops with an error.

Every measured command runs as its own process; peak RSS is its VmHWM, polled every 50 ms
(merge_vs_mergekit.run_tool). Big files (calibration data, statistics cache, merge outputs)
go under ``--scratch`` (default /tmp/stats_bench). Results: ``benchmarks/results/
stats_memory[_TAG].json`` (see benchmarks/README.md, "Statistics step and RegMean merge").
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_vs_mergekit import ROOT, SIZES, _hardware, build_checkpoints, run_tool  # noqa: E402

SEQ_LEN = 512
DATA_ROWS = 256  # sequences per calibration file; a run with n_examples N reads the first N
BATCH_SIZE = 8
FINE_TUNES = ("ft1", "ft2", "ft3")
LINEAR_WEIGHTS = (0.5, 0.3, 0.2)  # merge_vs_mergekit's linear recipe


# -- sizes ---------------------------------------------------------------------------------
def gram_layout(size: str) -> dict[str, Any]:
    """Entries of the Gram matrices the collector keeps for a LlamaForCausalLM of ``size``:
    one ``(in, in)`` per linear layer (q, k, v, o, gate, up, down per decoder layer, plus
    the untied LM head)."""
    c = SIZES[size]
    h, i, n_layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    per_layer = 6 * h * h + i * i  # q, k, v, o, gate, up: (h, h); down: (i, i)
    head = h * h
    total = n_layers * per_layer + head
    return {
        "linear_layers": 7 * n_layers + 1,
        "entries_per_decoder_layer": per_layer,
        "entries_total": total,
        "float64_bytes_total": 8 * total,  # the collector's accumulators
        "float32_bytes_total": 4 * total,  # what the cache file stores
        "float32_bytes_per_decoder_layer": 4 * per_layer,
        "float64_bytes_per_decoder_layer": 8 * per_layer,
        "largest_matrix_float32_bytes": 4 * max(h, i) ** 2,
    }


# -- calibration data ----------------------------------------------------------------------
def calibration_file(scratch: Path, model: str, vocab: int) -> Path:
    """``DATA_ROWS`` random token sequences of ``SEQ_LEN`` (seeded per model), no padding."""
    from safetensors.torch import save_file

    path = scratch / "data" / f"{model}-{DATA_ROWS}x{SEQ_LEN}-v{vocab}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(1000 + FINE_TUNES.index(model))
        ids = torch.randint(0, vocab, (DATA_ROWS, SEQ_LEN), generator=g)  # (examples, tokens)
        save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(path))
    return path


def data_block(path: Path, n: int) -> dict[str, Any]:
    return {"path": str(path), "n_examples": n, "batch_size": BATCH_SIZE}


# -- the statistics step, in a child process -----------------------------------------------
def _status(pid: str = "self") -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            out[key] = int(value.split()[0]) // 1024  # MB
    return out


def child_stats(model_dir: str, data: str, n: int) -> None:
    """What ``brickwork merge`` does for one model entry of a regmean recipe
    (``recipe_statistics``): load the model as transformers does, load the data block, and
    ``statistics_for(..., "gram", model_hash=checkpoint checksum)``. The cache entry is
    removed first, so the statistics are computed, not read."""
    t0 = time.perf_counter()
    from brickwork.checkpoint.reader import open_checkpoint
    from brickwork.recipe import DataSpec
    from brickwork.stats import statistics_for
    from brickwork.stats.data import load_batches, load_hf_module
    from brickwork.stats.store import cache_path, data_hash

    ck = open_checkpoint(Path(model_dir))
    t_import = time.perf_counter() - t0
    module = load_hf_module(ck.path, model_dir)
    spec = DataSpec(**data_block(Path(data), n))
    batches = load_batches(spec, model_dir=ck.model_dir, vocab_size=None, where=model_dir)
    mh = ck.checksum()
    path = cache_path(mh, data_hash(batches, {"kind": "gram"}), "gram")
    path.unlink(missing_ok=True)
    t_load = time.perf_counter() - t0 - t_import
    after_load = _status()
    t1 = time.perf_counter()
    f = statistics_for(module, batches, "gram", model_hash=mh, where=model_dir)
    t_stats = time.perf_counter() - t1
    report = {
        "import_s": round(t_import, 2),
        "load_s": round(t_load, 2),
        "statistics_s": round(t_stats, 2),
        "model_dtype": str(next(module.parameters()).dtype).removeprefix("torch."),
        "model_parameters": sum(p.numel() for p in module.parameters()),
        "torch_threads": torch.get_num_threads(),
        "hit": f.hit,
        "examples": f.info["examples"],
        "rows": f.info["rows"],
        "tensors": len(f.names),
        "cache_file": str(f.path),
        "cache_file_bytes": f.path.stat().st_size,
        "rss_after_load_mb": after_load["VmRSS"],
        "hwm_after_load_mb": after_load["VmHWM"],
        "hwm_end_mb": _status()["VmHWM"],
    }
    print("RESULT " + json.dumps(report), flush=True)


def child_profile(model_dir: str, data: str, n: int) -> None:
    """Where the statistics step's time goes: the forward passes alone (no hooks), then
    ``collect_gram`` (the same passes plus the float64 Gram updates) on the same batches."""
    from brickwork.recipe import DataSpec
    from brickwork.stats.collect import collect_gram
    from brickwork.stats.data import load_batches, load_hf_module

    module = load_hf_module(Path(model_dir), model_dir)
    spec = DataSpec(**data_block(Path(data), n))
    batches = load_batches(spec, model_dir=Path(model_dir), vocab_size=None, where=model_dir)
    with torch.no_grad():
        t0 = time.perf_counter()
        for b in batches:
            module(**b)
        forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    collect_gram(module, batches)
    collect = time.perf_counter() - t0
    report = {
        "sequences": n,
        "tokens": n * SEQ_LEN,
        "model_dtype": str(next(module.parameters()).dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "forward_s": round(forward, 2),
        "collect_gram_s": round(collect, 2),
        "gram_updates_s": round(collect - forward, 2),
    }
    print("RESULT " + json.dumps(report), flush=True)


def child_merge_trace(recipe: str, out: str) -> None:
    """``brickwork.merge`` in this process, recording the resident high-water mark (VmHWM)
    after each output tensor is written: which tensors raise the peak."""
    import brickwork
    from brickwork.checkpoint.writer import CheckpointWriter

    trace: list[tuple[str, int]] = []
    real = CheckpointWriter.write

    def write(self: Any, name: str, tensor: torch.Tensor) -> None:
        real(self, name, tensor)
        trace.append((name, _status()["VmHWM"]))

    CheckpointWriter.write = write  # type: ignore[method-assign]
    brickwork.merge(recipe, out, progress=False, force=True)
    rises = [(n, h, h - p) for (n, h), (_, p) in zip(trace[1:], trace) if h > p]
    report = {
        "first": trace[0] if trace else None,
        "rises_mb": sorted(rises, key=lambda r: -r[2])[:12],
        "peak_mb": trace[-1][1] if trace else 0,
    }
    print("RESULT " + json.dumps(report), flush=True)


def _threads_env(threads: int, cache: Path, src: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["BRICKWORK_CACHE"] = str(cache)
    if src is not None:  # another brickwork source tree (e.g. `git archive` of a commit)
        env["PYTHONPATH"] = str(src)
    return env


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """run_tool with ``env`` (it passes its own environment to the child)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        lb = os.getloadavg()[0]
        wall, cpu, rss, anon = run_tool(cmd, log)
        la = os.getloadavg()[0]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {
        "command": " ".join(cmd).replace(str(ROOT) + "/", ""),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mb": round(rss),
        "peak_anon_mb": round(anon),
        "load_before": round(lb, 2),
        "load_after": round(la, 2),
    }


def measure_stats(
    paths: dict[str, Path], model: str, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    data = calibration_file(args.scratch, model, SIZES[args.size]["vocab_size"])
    cmd = [sys.executable, __file__, "_child-stats", str(paths[model]), str(data), str(n)]
    log = args.scratch / "logs" / f"stats-{args.size}-{model}-{n}.log"
    row = _run(cmd, log, _threads_env(args.threads, args.scratch / "cache", args.src))
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    row |= {"model": model, "sequences": n, "tokens": n * SEQ_LEN, "seq_len": SEQ_LEN}
    row |= json.loads(lines[-1].removeprefix("RESULT "))
    return row


# -- the merges ----------------------------------------------------------------------------
def merge_recipes(paths: dict[str, Path], scratch: Path, size: str, n: int) -> dict[str, Any]:
    vocab = SIZES[size]["vocab_size"]
    fts = [str(paths[m]) for m in FINE_TUNES]
    return {
        "linear": {
            "method": "linear",
            "models": [
                {"model": p, "parameters": {"weight": w}} for p, w in zip(fts, LINEAR_WEIGHTS)
            ],
        },
        "regmean": {
            "method": "regmean",
            "models": [
                {"model": p, "data": data_block(calibration_file(scratch, m, vocab), n)}
                for p, m in zip(fts, FINE_TUNES)
            ],
            "parameters": {"alpha": 0.9},
        },
    }


def measure_merge(
    paths: dict[str, Path], method: str, args: argparse.Namespace, repeat: int
) -> dict[str, Any]:
    recipe = merge_recipes(paths, args.scratch, args.size, args.merge_n)[method]
    rec = args.scratch / "recipes" / f"{args.size}-{method}.yml"
    rec.parent.mkdir(parents=True, exist_ok=True)
    rec.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = args.scratch / "out" / f"{args.size}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    brickwork = Path(sys.executable).parent / "brickwork"
    cmd = [str(brickwork), "merge", str(rec), str(out), "-q"]
    log = args.scratch / "logs" / f"merge-{args.size}-{method}-{repeat}.log"
    cache = args.scratch / "cache" / "statistics"
    before = set(cache.glob("*.safetensors"))
    row = _run(cmd, log, _threads_env(args.threads, args.scratch / "cache", args.src))
    row |= {"method": method, "repeat": repeat, "recipe": recipe}
    if method == "regmean":  # every model's statistics must have come from the cache
        prov = json.loads((out / "brickwork.json").read_text())
        files = [s["cache_file"] for s in prov["statistics"]]
        new = set(cache.glob("*.safetensors")) - before
        if new or not all(Path(f) in before for f in files):
            raise SystemExit(f"regmean computed statistics instead of reading them: {new}")
        row["statistics_files"] = files
    shutil.rmtree(out, ignore_errors=True)
    return row


# -- main ----------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    from brickwork.checkpoint.provenance import version_string

    v = {"brickwork": version_string(), "python": platform.python_version()}
    for pkg in ("torch", "safetensors", "transformers"):
        v[pkg] = md.version(pkg)
    return v


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def scaling(rows: list[dict[str, Any]], budget_min: float) -> dict[str, Any] | None:
    """Seconds per 1,000 tokens at each measured point and a linear extrapolation to 256
    sequences from the largest one (statistics time only, excluding imports and loading)."""
    pts = sorted((r["tokens"], r["statistics_s"]) for r in rows)
    if not pts:
        return None
    tokens, secs = pts[-1]
    est = secs * DATA_ROWS * SEQ_LEN / tokens
    out = {
        "s_per_1k_tokens": {str(t): round(1000 * s / t, 2) for t, s in pts},
        "extrapolated_256_statistics_s": round(est),
        "extrapolated_from_tokens": tokens,
        "budget_min": budget_min,
        "run_256": est / 60 < budget_min,
    }
    if len(pts) >= 2:
        (t0, s0), (t1, s1) = pts[0], pts[-1]
        out["time_ratio"] = round(s1 / s0, 2)
        out["token_ratio"] = round(t1 / t0, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child-stats":
        child_stats(argv[1], argv[2], int(argv[3]))
        return
    if argv and argv[0] == "_child-merge-trace":
        child_merge_trace(argv[1], argv[2])
        return
    if argv and argv[0] == "_child-profile":
        child_profile(argv[1], argv[2], int(argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.5b", choices=sorted(SIZES))
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache/brickwork/bench-merge")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/stats_bench"))
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per process")
    ap.add_argument(
        "--stats",
        default="ft1:8,ft1:32",
        help="statistics runs, MODEL:SEQUENCES,...; 'auto256' adds ft1:256 when the "
        "extrapolation is below --budget-min",
    )
    ap.add_argument("--budget-min", type=float, default=12.0)
    ap.add_argument(
        "--merge-n", type=int, default=8, help="sequences behind the merge's statistics"
    )
    ap.add_argument("--no-merge", action="store_true")
    ap.add_argument(
        "--profile-sequences", type=int, default=0, help="also time forward vs Gram updates"
    )
    ap.add_argument("--merge-repeats", type=int, default=1)
    ap.add_argument(
        "--trace", action="store_true", help="also: VmHWM after each tensor of a regmean merge"
    )
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    ap.add_argument(
        "--src", type=Path, help="brickwork source tree for the measured processes (PYTHONPATH)"
    )
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    from rich.console import Console

    console = Console()
    for sub in ("data", "cache", "logs", "out"):
        (args.scratch / sub).mkdir(parents=True, exist_ok=True)
    paths = build_checkpoints(args.workdir, args.size, console)
    result: dict[str, Any] = {
        "benchmark": "stats_memory",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/stats_memory.py", *argv]),
        "size": args.size,
        "model_config": SIZES[args.size],
        "seq_len": SEQ_LEN,
        "batch_size": BATCH_SIZE,
        "torch_threads": args.threads,
        "brickwork_src": str(args.src) if args.src else "the working tree",
        "gram_layout": gram_layout(args.size),
        "uptime_before": _uptime(),
        "versions": _versions(),
        "hardware": _hardware() | {"torch_threads": args.threads},
        "statistics": [],
        "merges": [],
    }
    console.print(result["uptime_before"])
    wanted = [s for s in args.stats.split(",") if s and s != "auto256"]
    for spec in wanted:
        model, n = spec.split(":")
        row = measure_stats(paths, model, int(n), args)
        result["statistics"].append(row)
        console.print(
            f"stats {model} {n:>4} seq: {row['statistics_s']:.1f} s statistics "
            f"({row['wall_s']:.1f} s process), peak RSS {row['peak_rss_mb']} MB, "
            f"model {row['model_dtype']}, load {row['load_before']}→{row['load_after']}"
        )
    fts1 = [r for r in result["statistics"] if r["model"] == "ft1"]
    result["scaling"] = scaling(fts1, args.budget_min)
    if "auto256" in args.stats and result["scaling"]:
        if result["scaling"]["run_256"]:
            result["statistics"].append(measure_stats(paths, "ft1", DATA_ROWS, args))
        else:
            console.print(
                f"not running 256 sequences: extrapolated "
                f"{result['scaling']['extrapolated_256_statistics_s'] / 60:.0f} min > "
                f"{args.budget_min} min"
            )
    if args.profile_sequences:
        data = calibration_file(args.scratch, "ft1", SIZES[args.size]["vocab_size"])
        n = str(args.profile_sequences)
        cmd = [sys.executable, __file__, "_child-profile", str(paths["ft1"]), str(data), n]
        log = args.scratch / "logs" / f"profile-{args.size}-{n}.log"
        row = _run(cmd, log, _threads_env(args.threads, args.scratch / "cache", args.src))
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
        result["profile"] = row | json.loads(lines[-1].removeprefix("RESULT "))
        console.print(result["profile"])
    if not args.no_merge:
        for rep in range(args.merge_repeats):
            order = ("linear", "regmean") if rep % 2 == 0 else ("regmean", "linear")
            for method in order:
                row = measure_merge(paths, method, args, rep)
                result["merges"].append(row)
                console.print(
                    f"merge {method:8} #{rep}: {row['wall_s']:.1f} s, peak RSS "
                    f"{row['peak_rss_mb']} MB (anon {row['peak_anon_mb']} MB), load "
                    f"{row['load_before']}→{row['load_after']}"
                )
        if args.trace:
            rec = args.scratch / "recipes" / f"{args.size}-regmean.yml"
            out = args.scratch / "out" / f"{args.size}-regmean-trace"
            cmd = [sys.executable, __file__, "_child-merge-trace", str(rec), str(out)]
            log = args.scratch / "logs" / f"trace-{args.size}-regmean.log"
            row = _run(cmd, log, _threads_env(args.threads, args.scratch / "cache", args.src))
            lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
            result["merge_trace"] = row | json.loads(lines[-1].removeprefix("RESULT "))
            shutil.rmtree(out, ignore_errors=True)
            console.print(result["merge_trace"])
        result["goal"] = merge_goal(result)
        if result["goal"]:
            console.print(result["goal"])
    result["uptime_after"] = _uptime()
    console.print(result["uptime_after"])
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "stats_memory" if args.size == "0.5b" else f"stats_memory_{args.size}"
    stem += f"_{args.tag}" if args.tag else ""
    (args.results / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.results / stem}.json")


def merge_goal(result: dict[str, Any]) -> dict[str, Any] | None:
    """Issue 10: regmean's peak RSS ≤ 1.5 × linear's + one decoder layer's statistics (the
    Gram matrices of its seven linear layers, float32 as stored, for each of the 3 models)."""
    peak = {
        m: max(r["peak_rss_mb"] for r in result["merges"] if r["method"] == m)
        for m in ("linear", "regmean")
        if any(r["method"] == m for r in result["merges"])
    }
    if len(peak) < 2:
        return None
    layer_mb = len(FINE_TUNES) * result["gram_layout"]["float32_bytes_per_decoder_layer"] / 2**20
    limit = 1.5 * peak["linear"] + layer_mb
    return {
        "linear_peak_rss_mb": peak["linear"],
        "regmean_peak_rss_mb": peak["regmean"],
        "ratio": round(peak["regmean"] / peak["linear"], 2),
        "one_layer_statistics_mb": round(layer_mb),
        "limit_mb": round(limit),
        "met": peak["regmean"] <= limit,
        "margin_mb": round(limit - peak["regmean"]),
    }


if __name__ == "__main__":
    main()
