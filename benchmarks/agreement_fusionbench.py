"""brickwork's tsv_m, iso_c, iso_cts and wudi against FusionBench's implementations.

Builds a seeded base and four fine-tunes (task vectors with a shared and a task-specific
part) of a few layer shapes — 2-D matrices, a 1-D bias / norm vector and a 3-D kernel —
writes them as safetensors, runs FusionBench's merge functions on CPU in FusionBench's own
virtual environment (a subprocess: fusion-bench is never a dependency of brickwork), runs
brickwork's methods in this one on the same tensors, and prints the max absolute difference
and the relative error ‖brickwork − FusionBench‖ / ‖FusionBench − base‖ per method and tensor.

    python3.11 -m venv /work/venv-fusionbench
    /work/venv-fusionbench/bin/pip install torch==2.13.0 && \\
        /work/venv-fusionbench/bin/pip install fusion-bench==0.2.33
    .venv/bin/python benchmarks/agreement_fusionbench.py [--fusionbench-python PATH] [--json OUT]

FusionBench 0.2.33 has no PCB, so ``pcb`` is not compared (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHAPES: dict[str, tuple[int, ...]] = {
    "attn.q.weight": (64, 64),
    "mlp.up.weight": (128, 48),  # tall
    "mlp.down.weight": (48, 128),  # wide
    "embed.weight": (200, 32),  # an embedding: 2-D, merged as a matrix by every method here
    "attn.q.bias": (64,),
    "norm.weight": (48,),
    "conv.weight": (16, 8, 3),  # ≥3-D: the mean rule
}
N_TASKS = 4
WUDI_ITERATIONS = 300  # FusionBench's function default
ISO_FRACTION = 0.8

# brickwork method -> parameters (each matching FusionBench's defaults, scaling factors 1)
BRICKWORK = {
    "tsv_m": {"alpha": 1.0},
    "iso_c": {"alpha": 1.0},
    "iso_cts": {"alpha": 1.0, "common_space_fraction": ISO_FRACTION},
    "wudi": {"iterations": WUDI_ITERATIONS, "lr": 1e-5},
}

# Run with FusionBench's interpreter: reads task vectors, writes each method's merged task
# vector. Only FusionBench's public merge functions are called; nothing of it is copied.
FUSIONBENCH_SIDE = r"""
import sys, time, json
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
    compute_and_sum_svd_mem_reduction,
)
from fusion_bench.method.wudi.wudi import wudi_merging

work, n, iters, fraction = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
tvs = [load_file(str(work / f"tv{i}.safetensors")) for i in range(n)]
runs = {
    "tsv_m": lambda: compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"),
    "iso_c": lambda: iso_c(tvs, accelerator="cpu"),
    "iso_cts": lambda: iso_cts(tvs, common_space_fraction=fraction, accelerator="cpu"),
    "wudi": lambda: wudi_merging(tvs, accelerator="cpu", iter_num=iters),
}
seconds = {}
for name, run in runs.items():
    t = time.perf_counter()
    out = run()
    seconds[name] = time.perf_counter() - t
    save_file({k: v.detach().float().contiguous() for k, v in out.items()},
              str(work / f"fb_{name}.safetensors"))
import importlib.metadata as md
(work / "fb_meta.json").write_text(json.dumps(
    {"fusion_bench": md.version("fusion-bench"), "torch": torch.__version__, "seconds": seconds}))
"""


def build(seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A base and N_TASKS task vectors: 0.01·(shared + own) per entry, float32."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    shared = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    tvs = [
        {k: 0.01 * (0.5 * shared[k] + torch.randn(s, generator=g)) for k, s in SHAPES.items()}
        for _ in range(N_TASKS)
    ]
    return base, tvs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fusionbench-python", default="/work/venv-fusionbench/bin/python")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    from brickwork.merge.api import merge_state_dicts

    base, tvs = build()
    fine_tunes = [{k: base[k] + tv[k] for k in base} for tv in tvs]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i, ft in enumerate(fine_tunes):  # θ_i − θ_base in float32, as FusionBench takes it
            save_file({k: ft[k] - base[k] for k in base}, str(work / f"tv{i}.safetensors"))
        proc = subprocess.run(
            [
                args.fusionbench_python,
                "-c",
                FUSIONBENCH_SIDE,
                str(work),
                str(N_TASKS),
                str(WUDI_ITERATIONS),
                str(ISO_FRACTION),
            ],
            capture_output=True,  # FusionBench prints a line and a progress bar per tensor
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(f"FusionBench side failed:\n{proc.stderr[-3000:]}")
        meta = json.loads((work / "fb_meta.json").read_text())
        theirs = {m: load_file(str(work / f"fb_{m}.safetensors")) for m in BRICKWORK}

    rows = []
    print(
        f"fusion-bench {meta['fusion_bench']}, torch {meta['torch']} (FusionBench side); "
        f"torch {torch.__version__} (brickwork side); {N_TASKS} task vectors, float32, CPU"
    )
    print(f"{'method':<8} {'tensor':<16} {'shape':<12} {'max |diff|':>11} {'rel. error':>11}")
    for method, params in BRICKWORK.items():
        ours = merge_state_dicts(method, fine_tunes, base=base, parameters=params)
        for k in SHAPES:
            expected = base[k] + theirs[method][k]  # FusionBench returns the task vector
            diff = (ours[k] - expected).abs()
            rel = float(torch.linalg.vector_norm(ours[k] - expected)) / float(
                torch.linalg.vector_norm(theirs[method][k])
            )
            rows.append({"method": method, "tensor": k, "max_abs": float(diff.max()), "rel": rel})
            shape = "x".join(map(str, SHAPES[k]))
            print(f"{method:<8} {k:<16} {shape:<12} {float(diff.max()):>11.2e} {rel:>11.2e}")
    moved = merge_state_dicts("wudi", fine_tunes, base=base, parameters=BRICKWORK["wudi"])
    total = merge_state_dicts("task_arithmetic", fine_tunes, base=base)
    shift = max(
        float(torch.linalg.vector_norm(moved[k] - total[k]))
        / float(torch.linalg.vector_norm(total[k] - base[k]))
        for k in SHAPES
        if len(SHAPES[k]) == 2
    )
    print(f"wudi's largest move away from the sum of task vectors: {shift:.1%} of its norm")
    secs = ", ".join(f"{m} {s:.2f} s" for m, s in meta["seconds"].items())
    print(f"FusionBench's wall time per method: {secs}")
    if args.json is not None:
        out = {"meta": meta, "rows": rows, "wudi_shift": shift}
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
