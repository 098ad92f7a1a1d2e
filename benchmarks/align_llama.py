"""Time and memory of weight matching a Llama checkpoint onto a randomly permuted copy of itself.

Builds model A (the Llama config and weights of ``merge_vs_mergekit.py``'s base model, bfloat16
sharded safetensors) and model B = A with every group of
``hf_permutation_spec(config, names)`` (FFN units, heads, within-head V/O dimensions; no
residual stream) randomly permuted, then runs
:func:`brickwork.align.streamed.weight_matching_streamed` on the two directories in a child
process of one torch thread, which reads one layer's FFN or attention tensors at a time.
Reports the matching's wall time, the child's peak RSS (VmHWM), and whether B permuted by
the found permutations equals A exactly (checked tensor by tensor afterwards).

    python benchmarks/align_llama.py --size 0.5b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _vmrss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(workdir: Path, size: str, seed: int) -> dict[str, Path]:
    """Write A and the permuted B (cached by size and seed); return their directories."""
    import torch
    from merge_vs_mergekit import SIZES, _base_tensor, _llama_config, _shards, _tensor_shapes
    from safetensors.torch import save_file

    from brickwork.align.hf_spec import hf_permutation_spec
    from brickwork.align.spec import permute_tensor

    root = workdir / size
    paths = {"a": root / "a", "b": root / f"b-seed{seed}"}
    stamp = {"size": SIZES[size], "seed": seed, "generator": 1}
    if all((p / "complete.json").is_file() for p in paths.values()) and all(
        json.loads((p / "complete.json").read_text()) == stamp for p in paths.values()
    ):
        return paths
    cfg = _llama_config(size)
    shapes = _tensor_shapes(cfg)
    spec = hf_permutation_spec(cfg, shapes.keys())
    g = torch.Generator().manual_seed(seed)
    perms = {grp.name: torch.randperm(grp.size, generator=g) for grp in spec.groups}
    moves = spec.members_of()
    shards = _shards(shapes, 400 * 2**20)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    t0 = time.perf_counter()
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(p)
        index = {
            "metadata": {"total_size": 2 * sum(torch.Size(s).numel() for s in shapes.values())},
            "weight_map": {n: files[i] for i, names in enumerate(shards) for n in names},
        }
        (p / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for i, names in enumerate(shards):
        a = {n: _base_tensor(n, shapes[n]).to(torch.bfloat16) for n in names}
        b = {n: permute_tensor(t, moves[n], perms) if n in moves else t for n, t in a.items()}
        save_file(a, str(paths["a"] / files[i]), metadata={"format": "pt"})
        save_file(b, str(paths["b"] / files[i]), metadata={"format": "pt"})
        del a, b
    for p in paths.values():
        (p / "complete.json").write_text(json.dumps(stamp))
    print(f"built A and B ({size}) in {time.perf_counter() - t0:.0f}s under {root}", flush=True)
    return paths


def match(a: str, b: str) -> dict:
    """The child process: matching, then the recovery check, as JSON on stdout."""
    import torch

    torch.set_num_threads(1)
    from brickwork.align.hf_spec import hf_permutation_spec
    from brickwork.align.spec import permute_tensor
    from brickwork.align.streamed import components, weight_matching_streamed
    from brickwork.checkpoint import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    rss_before = _vmrss_mb()
    spec = hf_permutation_spec(ca.config, ca.names)
    parts = components(spec)
    largest = max(
        sum(ca.info(n).nbytes for n in {m.tensor for g in p.groups for m in g.members})
        for p in parts
    )
    t0 = time.perf_counter()
    result = weight_matching_streamed(spec, ca, cb, seed=0)
    seconds = time.perf_counter() - t0
    peak = _vmhwm_mb()
    moves = spec.members_of()
    wrong = [
        n
        for n in moves
        if not torch.equal(permute_tensor(cb.get(n), moves[n], result.perms), ca.get(n))
    ]
    return {
        "match_seconds": round(seconds, 1),
        "peak_rss_mb": round(peak, 0),
        "rss_before_match_mb": round(rss_before, 0),
        "groups": len(spec.groups),
        "components": len(parts),
        "largest_component_mb_bf16": round(largest / 2**20, 1),
        "passes_max": result.iterations,
        "objective_identity": result.objective[0],
        "objective_final": result.objective[-1],
        "recovered": not wrong,
        "tensors_not_recovered": wrong[:10],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.5b", choices=["tiny", "0.1b", "0.5b"])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache/brickwork/bench-align")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/align_llama.json")
    ap.add_argument("--match", nargs=2, metavar=("A", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.match:
        print(json.dumps(match(*args.match)))
        return
    import torch

    paths = build(args.workdir, args.size, args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--match", str(paths["a"]), str(paths["b"])]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    child = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    row = json.loads(child.stdout.strip().splitlines()[-1])
    nbytes = sum(
        json.loads((paths["a"] / "model.safetensors.index.json").read_text())["metadata"].values()
    )
    import transformers

    row.update(
        size=args.size,
        model_mb_bf16=round(nbytes / 2**20, 0),
        child_wall_seconds=round(wall, 1),
        load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in os.getloadavg()],
        torch=torch.__version__,
        transformers=transformers.__version__,
        cpu=platform.processor() or platform.machine(),
        command=f"python benchmarks/align_llama.py --size {args.size} --seed {args.seed}",
    )
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[args.size] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
