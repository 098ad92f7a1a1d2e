"""Tokens/second of brickwork's top-k MoE layer vs a dense FFN and naive every-expert dispatch.

    .venv/bin/python benchmarks/moe_dispatch.py            # defaults: top-2 of 8, CPU, 2 threads
    .venv/bin/python benchmarks/moe_dispatch.py --repeats 9 --tokens 8192

(a) dense: one SwiGLU FFN with the MoE's *active* parameters (d_ff = top_k * d_ff_expert);
(b) naive: ``MoELayer.forward_dense_reference`` (every expert on every token, then masked).
Prints a Markdown table and one JSON line with the figures, versions and machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from brickwork.route import FFN, MoELayer


def _median_seconds(
    fns: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process-CPU time of each function; repeats are interleaved so that
    load from other processes on a shared machine hits every variant alike."""
    for f in fns.values():
        f()  # warm-up
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    med = statistics.median
    return {k: med(v) for k, v in wall.items()}, {k: med(v) for k, v in cpu.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1408, help="per expert")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    moe = MoELayer(args.d_model, args.d_ff, args.experts, top_k=args.top_k, device=dev)
    torch.nn.init.normal_(moe.router.weight, std=1.0)  # spread tokens over experts
    dense = FFN(args.d_model, args.top_k * args.d_ff, device=dev)
    x = torch.randn(args.tokens, args.d_model, device=dev)  # (tokens, d_model)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    runs = {
        "moe sparse dispatch": lambda: (moe(x), sync()),
        f"(a) dense FFN, d_ff={args.top_k * args.d_ff}": lambda: (dense(x), sync()),
        "(b) naive: every expert, masked": lambda: (moe.forward_dense_reference(x), sync()),
    }
    with torch.inference_mode():
        secs, cpu = _median_seconds(runs, args.repeats)
        counts = torch.bincount(moe.route(x).indices.reshape(-1), minlength=args.experts)
    ref = secs["moe sparse dispatch"]
    print(
        f"top-{args.top_k} of {args.experts} experts, d_model {args.d_model}, d_ff/expert "
        f"{args.d_ff}, {args.tokens} tokens, float32, {dev}, {args.threads} threads, "
        f"median of {args.repeats}; tokens per expert {counts.tolist()}"
    )
    cref = cpu["moe sparse dispatch"]
    print("| layer | wall ms | tokens/s | MoE / this (wall) | CPU ms | MoE / this (CPU) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k, s in secs.items():
        c = cpu[k]
        print(
            f"| {k} | {s * 1e3:.1f} | {args.tokens / s:,.0f} | {s / ref:.2f}x "
            f"| {c * 1e3:.1f} | {c / cref:.2f}x |"
        )
    print(
        json.dumps(
            {
                "args": vars(args),
                "seconds": secs,
                "cpu_seconds": cpu,
                "moe_vs_dense": secs[next(iter(list(secs)[1:]))] / ref,
                "moe_vs_naive": secs["(b) naive: every expert, masked"] / ref,
                "torch": torch.__version__,
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "loadavg": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
