"""brickwork vs mergekit on the same mergekit YAML recipes: wall time, peak memory, agreement.

Builds random Llama-architecture checkpoints (a base and three fine-tunes, bfloat16, cached
under ``--workdir``), runs linear / task_arithmetic / ties / slerp recipes through both
tools as separate processes, and compares the outputs tensor by tensor.

    .venv/bin/python benchmarks/merge_vs_mergekit.py            # ≈0.5B parameters
    .venv/bin/python benchmarks/merge_vs_mergekit.py --size tiny  # smoke run, seconds
    .venv/bin/python benchmarks/merge_vs_mergekit.py --size 0.1b  # 134M parameters, minutes

Results go to ``benchmarks/results/merge_vs_mergekit.{json,md}`` (see benchmarks/README.md).
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
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
GEN_VERSION = 1  # bump when the checkpoint generator changes: cached models are rebuilt
SIZES: dict[str, dict[str, int]] = {
    # hidden, intermediate, layers, heads, vocab; parameter counts are printed at build time
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
    ),
    "0.1b": dict(  # 134M parameters, 0.27 GB per model: profiling, quick comparisons
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
    ),
    "0.5b": dict(  # 477M parameters, 0.95 GB per model in bfloat16
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    ),
}
MODELS = ("base", "ft1", "ft2", "ft3")
TIES_DENSITY = 0.5


# -- checkpoints ---------------------------------------------------------------------------
def _llama_config(size: str) -> Any:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SIZES[size], tie_word_embeddings=False, max_position_embeddings=2048)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    return cfg


def _tensor_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a LlamaForCausalLM, from a model on the meta device (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _gen(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def _base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = _gen(0, name)
    if len(shape) == 1:  # norm weights around 1
        return 1 + 0.05 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _delta(j: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Fine-tune ``j``'s update: a rank-16 part plus dense noise, ≈5 % of the weights' scale,
    so task vectors have structure (TIES) and fine-tunes are not collinear (slerp)."""
    g = _gen(j, name)
    if len(shape) == 1:
        return 0.005 * torch.randn(shape, generator=g)
    r = 16
    u = torch.randn(shape[0], r, generator=g)  # (out, r)
    v = torch.randn(r, shape[1], generator=g)  # (r, in)
    low_rank = (u @ v) / r**0.5  # (out, in), unit variance
    return 0.001 * (0.8 * low_rank + 0.6 * torch.randn(shape, generator=g))


def _shards(shapes: dict[str, tuple[int, ...]], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def build_checkpoints(workdir: Path, size: str, console: Any) -> dict[str, Path]:
    """Write base + ft1..ft3 as sharded bfloat16 safetensors, unless already cached."""
    root = workdir / size
    stamp = root / "complete.json"
    spec = {"generator": GEN_VERSION, "size": SIZES[size]}
    paths = {m: root / m for m in MODELS}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    cfg = _llama_config(size)
    shapes = _tensor_shapes(cfg)
    n_params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    console.print(f"building {size} checkpoints ({n_params / 1e6:.1f}M parameters) in {root}")
    shards = _shards(shapes, 400 * 2**20)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for p in paths.values():
        p.mkdir(parents=True)
        cfg.save_pretrained(p)
        index = {
            "metadata": {"total_size": 2 * n_params},
            "weight_map": {n: files[i] for i, names in enumerate(shards) for n in names},
        }
        (p / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    t0 = time.perf_counter()
    for i, names in enumerate(shards):
        out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MODELS}
        for name in names:
            base = _base_tensor(name, shapes[name]).to(torch.bfloat16)
            out["base"][name] = base
            for j, m in enumerate(MODELS[1:], start=1):
                out[m][name] = (base.float() + _delta(j, name, shapes[name])).to(torch.bfloat16)
        for m in MODELS:
            save_file(out[m], str(paths[m] / files[i]), metadata={"format": "pt"})
        del out
    stamp.write_text(json.dumps(spec))
    console.print(f"  built in {time.perf_counter() - t0:.0f}s")
    return paths


# -- recipes -------------------------------------------------------------------------------
def recipes(paths: dict[str, Path], dtype: str) -> dict[str, dict[str, Any]]:
    """The mergekit YAML recipes, computing in ``dtype`` and writing bfloat16."""
    p = {k: str(v) for k, v in paths.items()}
    out = {"dtype": dtype, "out_dtype": "bfloat16"}

    def weighted(ws: list[float], **extra: float) -> list[dict[str, Any]]:
        return [
            {"model": p[m], "parameters": {"weight": w, **extra}}
            for m, w in zip(("ft1", "ft2", "ft3"), ws)
        ]

    return {
        "linear": {"merge_method": "linear", "models": weighted([0.5, 0.3, 0.2]), **out},
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": p["base"],
            "models": weighted([0.5, 0.3, 0.2]),
            "parameters": {"lambda": 0.9},
            **out,
        },
        "ties": {
            "merge_method": "ties",
            "base_model": p["base"],
            "models": weighted([1.0, 0.7, 0.5], density=TIES_DENSITY),
            **out,
        },
        "model_stock": {  # not in the default --recipes
            "merge_method": "model_stock",
            "base_model": p["base"],
            "models": [{"model": p[m]} for m in ("ft1", "ft2", "ft3")],
            **out,
        },
        "slerp": {  # the usual two-model slerp with per-module gradients
            "merge_method": "slerp",
            "base_model": p["ft1"],
            "models": [{"model": p["ft1"]}, {"model": p["ft2"]}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            **out,
        },
    }


# -- running a tool ------------------------------------------------------------------------
@dataclass
class Run:
    tool: str
    recipe: str
    dtype: str
    repeat: int
    wall_s: float
    cpu_s: float  # user + system time of the child
    peak_rss_mb: float  # VmHWM of the process tree (resident high-water mark), polled
    peak_anon_mb: float  # largest sampled RssAnon: resident memory not backed by files
    load_before: float
    load_after: float
    command: list[str] = field(default_factory=list)


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                out[key] = int(value.split()[0])
    return out


def _poll_memory(proc: psutil.Process, stop: threading.Event, peak: dict[str, int]) -> None:
    """Every 50 ms: the tree's summed VmHWM (monotonic, so only growth in the last 50 ms
    can be missed) and RssAnon. Not ru_maxrss: Linux carries the parent's high-water mark
    across fork + exec into the child's, so it would report this script's own memory."""
    while not stop.is_set():
        try:
            tree = [proc, *proc.children(recursive=True)]
            stats = [_status_kb(q.pid) for q in tree]
            for key in ("VmHWM", "RssAnon"):
                peak[key] = max(peak[key], sum(s.get(key, 0) for s in stats))
        except (psutil.Error, OSError):
            pass
        stop.wait(0.05)


def run_tool(cmd: list[str], log: Path) -> tuple[float, float, float, float]:
    """Run ``cmd``; return (wall s, CPU s, peak RSS MB, peak anonymous MB)."""
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        stop, peak = threading.Event(), {"VmHWM": 0, "RssAnon": 0}
        poller = threading.Thread(target=_poll_memory, args=(psutil.Process(proc.pid), stop, peak))
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        poller.join()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, peak["VmHWM"] / 1024, peak["RssAnon"] / 1024


# -- comparing outputs ---------------------------------------------------------------------
class _Tensors:
    """Every tensor of a model directory, memory-mapped, read one at a time."""

    def __init__(self, directory: Path) -> None:
        self.handles = [safe_open(str(f), "pt") for f in sorted(directory.glob("*.safetensors"))]
        self.where = {k: h for h in self.handles for k in h.keys()}  # noqa: SIM118

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)


def _at_threshold(name: str, inputs: dict[str, _Tensors], ties: dict[str, Any]) -> torch.Tensor:
    """Entries where some model's |task vector| equals its magnitude-trim threshold. Task
    vectors are computed in the recipe's ``dtype``, as both tools compute them."""
    dtype = getattr(torch, ties["dtype"])
    base = inputs[ties["base_model"]].get(name).to(dtype)
    mask = torch.zeros(base.shape, dtype=torch.bool)
    for entry in ties["models"]:
        mag = (inputs[entry["model"]].get(name).to(dtype) - base).abs().float()
        k = max(1, int(entry["parameters"]["density"] * mag.numel()))
        thr = torch.topk(mag.reshape(-1), k, sorted=False).values.min()
        mask |= mag == thr
    return mask


def compare(
    a_dir: Path, b_dir: Path, *, ties: dict[str, Any] | None, inputs: dict[str, _Tensors]
) -> dict[str, Any]:
    """Largest |a - b| and the number of differing entries over all tensors (names, shapes and
    dtypes must match). With ``ties`` (a TIES recipe), also count differing entries that are
    not at a magnitude tie at the trim threshold."""
    a, b = _Tensors(a_dir), _Tensors(b_dir)
    if set(a.where) != set(b.where):
        only_a, only_b = sorted(set(a.where) - set(b.where)), sorted(set(b.where) - set(a.where))
        raise SystemExit(f"tensor names differ: only brickwork {only_a}, only mergekit {only_b}")
    res = {"tensors": len(a.where), "elements": 0, "max_abs_diff": 0.0, "differing": 0}
    res |= {"differing_tensors": 0, "worst_tensor": None}
    if ties is not None:
        res["differing_not_at_threshold"] = 0
    for name in sorted(a.where):
        x, y = a.get(name), b.get(name)
        if x.shape != y.shape or x.dtype != y.dtype:
            raise SystemExit(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
        ne = x != y
        res["elements"] += x.numel()
        n = int(ne.sum())
        if not n:
            continue
        diff = float((x.float() - y.float()).abs().max())
        res["differing"] += n
        res["differing_tensors"] += 1
        if diff > res["max_abs_diff"]:
            res["max_abs_diff"], res["worst_tensor"] = diff, name
        if ties is not None:
            res["differing_not_at_threshold"] += int(
                (ne & ~_at_threshold(name, inputs, ties)).sum()
            )
    return res


# -- provenance ----------------------------------------------------------------------------
def _versions(mergekit_python: Path) -> dict[str, str]:
    from brickwork.checkpoint.provenance import version_string

    v = {"brickwork": version_string(), "python": platform.python_version()}
    for pkg in ("torch", "safetensors", "transformers"):
        v[pkg] = md.version(pkg)
    code = "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"
    out = subprocess.run([str(mergekit_python), "-c", code], capture_output=True, text=True)
    mk, mk_torch = (out.stdout.split() + ["?", "?"])[:2]
    v |= {"mergekit": mk, "mergekit_torch": mk_torch}
    return v


def _hardware() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


# -- report --------------------------------------------------------------------------------
def summarise(runs: list[Run], diffs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for key, diff in diffs.items():
        dtype, recipe = key.split("/")

        def mean(tool: str, attr: str, dtype=dtype, recipe=recipe) -> float:
            xs = [
                getattr(r, attr)
                for r in runs
                if (r.tool, r.recipe, r.dtype) == (tool, recipe, dtype)
            ]
            return sum(xs) / len(xs)

        row = {"dtype": dtype, "recipe": recipe}
        for attr in ("wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb"):
            bw, mk = mean("brickwork", attr), mean("mergekit", attr)
            row |= {f"brickwork_{attr}": bw, f"mergekit_{attr}": mk, f"ratio_{attr}": bw / mk}
        rows.append(row | {"diff": diff})
    return rows


def _fmt_diff(d: dict[str, Any]) -> tuple[str, str]:
    count = f"{d['differing']:,} / {d['elements']:,}"
    if "differing_not_at_threshold" in d:
        count += f" ({d['differing_not_at_threshold']:,} not at threshold)"
    return f"{d['max_abs_diff']:.3g}", count


def markdown(result: dict[str, Any]) -> str:
    hw, v = result["hardware"], result["versions"]
    lines = [
        f"# brickwork vs mergekit — {result['size']} ({result['parameters'] / 1e6:.0f}M parameters)",
        "",
        f"Measured {result['date']} with `{result['command']}`.",
        f"brickwork {v['brickwork']}, mergekit {v['mergekit']}, torch {v['torch']} (mergekit: "
        f"{v['mergekit_torch']}), transformers {v['transformers']}, safetensors {v['safetensors']}.",
        f"{hw['cpu']}, {hw['cpu_count']} CPUs, {hw['ram_gb']} GiB RAM; load average "
        f"{result['load_before']} before, {result['load_after']} after.",
        "",
        "| recipe `dtype` | recipe | brickwork s | mergekit s | ratio | CPU s (bw / mk) "
        "| brickwork peak RSS MB | mergekit peak RSS MB | ratio | max abs diff | differing elements |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["summary"]:
        diff, count = _fmt_diff(r["diff"])
        lines.append(
            f"| {r['dtype']} | {r['recipe']} | {r['brickwork_wall_s']:.1f} | "
            f"{r['mergekit_wall_s']:.1f} | {r['ratio_wall_s']:.2f} | "
            f"{r['brickwork_cpu_s']:.1f} / {r['mergekit_cpu_s']:.1f} | "
            f"{r['brickwork_peak_rss_mb']:.0f} | {r['mergekit_peak_rss_mb']:.0f} | "
            f"{r['ratio_peak_rss_mb']:.2f} | {diff} | {count} |"
        )
    lines += [
        "",
        "Every run (wall s, CPU s, peak RSS MB, peak anonymous MB, 1-min load before → after):",
        "",
    ]
    for r in result["runs"]:
        lines.append(
            f"- {r['dtype']} {r['recipe']} #{r['repeat']} {r['tool']}: {r['wall_s']:.1f} s, "
            f"CPU {r['cpu_s']:.1f} s, "
            f"{r['peak_rss_mb']:.0f} MB, {r['peak_anon_mb']:.0f} MB, "
            f"load {r['load_before']:.2f} → {r['load_after']:.2f}"
        )
    lines += ["", "Commands: `" + "`, `".join(result["tool_commands"]) + "`", ""]
    return "\n".join(lines)


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"brickwork vs mergekit ({result['size']})")
    cols = ("dtype", "recipe", "bw s", "mk s", "ratio", "bw CPU s", "mk CPU s")
    cols += ("bw RSS MB", "mk RSS MB", "ratio")
    for col in (*cols, "max |diff|", "differing"):
        table.add_column(col)
    for r in result["summary"]:
        table.add_row(
            r["dtype"],
            r["recipe"],
            f"{r['brickwork_wall_s']:.1f}",
            f"{r['mergekit_wall_s']:.1f}",
            f"{r['ratio_wall_s']:.2f}",
            f"{r['brickwork_cpu_s']:.1f}",
            f"{r['mergekit_cpu_s']:.1f}",
            f"{r['brickwork_peak_rss_mb']:.0f}",
            f"{r['mergekit_peak_rss_mb']:.0f}",
            f"{r['ratio_peak_rss_mb']:.2f}",
            *_fmt_diff(r["diff"]),
        )
    Console(width=160).print(table)


# -- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache/brickwork/bench-merge")
    ap.add_argument(
        "--recipes", default="linear,task_arithmetic,ties,slerp", help="also: model_stock"
    )
    ap.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="recipe `dtype:` values: the compute dtype of both tools (linear and slerp "
        "accumulate in float32 either way)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool, order alternating")
    ap.add_argument("--brickwork", type=Path, default=Path(sys.executable).parent / "brickwork")
    ap.add_argument("--mergekit", type=Path, default=ROOT / ".venv-mergekit/bin/mergekit-yaml")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument(
        "--tag", default="", help="suffix of the result files (e.g. a commit), so earlier ones stay"
    )
    args = ap.parse_args(argv)
    console = Console()
    paths = build_checkpoints(args.workdir, args.size, console)
    inputs = {str(p): _Tensors(p) for p in paths.values()}
    n_params = sum(
        int(torch.Size(inputs[str(paths["base"])].where[n].get_slice(n).get_shape()).numel())
        for n in inputs[str(paths["base"])].where
    )
    tool_cmds = {
        "brickwork": lambda rec, out: [str(args.brickwork), "merge", str(rec), str(out), "-q"],
        "mergekit": lambda rec, out: [str(args.mergekit), str(rec), str(out), "--quiet"],
    }
    runs: list[Run] = []
    diffs: dict[str, dict[str, Any]] = {}
    load_before = round(os.getloadavg()[0], 2)
    for dtype in args.dtypes.split(","):
        all_recipes = recipes(paths, dtype)
        for ri, name in enumerate(args.recipes.split(",")):
            work = args.workdir / "runs" / args.size / dtype / name
            work.mkdir(parents=True, exist_ok=True)
            rec_path = work / "recipe.yml"
            rec_path.write_text(yaml.safe_dump(all_recipes[name], sort_keys=False))
            outs = {t: work / f"out-{t}" for t in tool_cmds}
            for rep in range(args.repeats):
                order = list(tool_cmds) if (ri + rep) % 2 == 0 else list(tool_cmds)[::-1]
                for tool in order:
                    shutil.rmtree(outs[tool], ignore_errors=True)
                    cmd = tool_cmds[tool](rec_path, outs[tool])
                    lb = os.getloadavg()[0]
                    wall, cpu, rss, anon = run_tool(cmd, work / f"{tool}.log")
                    la = os.getloadavg()[0]
                    run = Run(tool, name, dtype, rep, wall, cpu, rss, anon, lb, la, cmd)
                    runs.append(run)
                    console.print(
                        f"{dtype:8} {name:15} #{rep} {tool:9} {wall:7.1f} s (CPU {cpu:5.1f} s)  "
                        f"peak RSS {rss:7.0f} MB  anon {anon:7.0f} MB  load {lb:.2f}"
                    )
            ties = all_recipes[name] if name == "ties" else None
            diffs[f"{dtype}/{name}"] = d = compare(
                outs["brickwork"], outs["mergekit"], ties=ties, inputs=inputs
            )
            console.print(f"{'':8} {name:15} max |diff| {d['max_abs_diff']:.3g}, {_fmt_diff(d)[1]}")
            if not args.keep_outputs:
                for o in outs.values():
                    shutil.rmtree(o, ignore_errors=True)
    result = {
        "benchmark": "merge_vs_mergekit",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/merge_vs_mergekit.py", *sys.argv[1:]]),
        "tool_commands": [
            " ".join(tool_cmds[t]("RECIPE.yml", "OUT")).replace(str(ROOT) + "/", "")
            for t in tool_cmds
        ],
        "size": args.size,
        "model_config": SIZES[args.size],
        "parameters": n_params,
        "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 2),
        "versions": _versions(args.mergekit.parent / "python"),
        "hardware": _hardware(),
        "recipes": {  # per recipe `dtype:`
            dtype: {k: v for k, v in recipes(paths, dtype).items() if k in args.recipes}
            for dtype in args.dtypes.split(",")
        },
        "summary": summarise(runs, diffs),
        "runs": [asdict(r) for r in runs],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "merge_vs_mergekit" if args.size == "0.5b" else f"merge_vs_mergekit_{args.size}"
    stem += f"_{args.tag}" if args.tag else ""
    (args.results / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / f"{stem}.md").write_text(markdown(result))
    print_table(result)
    console.print(f"wrote {args.results / stem}.json and .md")


if __name__ == "__main__":
    main()
