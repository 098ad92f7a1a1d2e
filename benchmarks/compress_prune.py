"""Pruning on the LM suite: held-out loss of dense, magnitude, Wanda and SparseGPT at 50 % and
2:4; and time / peak RSS of streamed magnitude pruning of the 0.5B Llama.

    .venv/bin/python benchmarks/compress_prune.py lm      # the bench's LM-suite models
    .venv/bin/python benchmarks/compress_prune.py lm --quick
    .venv/bin/python benchmarks/compress_prune.py memory  # 0.5B Llama, magnitude 50 %

``lm``: the suite's pretrained small Llama and its per-domain fine-tunes (cached under
``$BRICKWORK_CACHE/bench``, trained on a miss). Each fine-tune is pruned with
``brickwork.compress.prune_model`` (calibration: 64 packed sequences of that domain's
fine-tuning documents, written as a ``.safetensors`` of input_ids; never val or test) and
its mean next-token loss on its domain's test split is compared with the dense base's and
the dense fine-tune's: *gain kept* = (base − pruned) / (base − fine-tune).

``memory``: ``brickwork compress prune MODEL OUT --sparsity 0.5`` on the bfloat16 0.5B Llama
of ``benchmarks/merge_vs_mergekit.py`` in a child process, its peak RSS (VmHWM, polled) and
its RSS right after imports, against the bytes of the largest layer's tensors.

Results: ``benchmarks/results/compress_prune{,_memory}.json`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PATTERNS: list[tuple[str, dict[str, Any]]] = [("50%", {"sparsity": 0.5}), ("2:4", {"nm": "2:4"})]
METHODS = ("magnitude", "wanda", "sparsegpt")
CALIB_SEQS = 64


def _bar(*_: Any) -> Any:
    return contextlib.nullcontext(None)


def lm(args: argparse.Namespace) -> dict[str, Any]:
    from safetensors.torch import save_file

    from brickwork.bench import lm_data as LD
    from brickwork.bench import lm_train as LT
    from brickwork.bench.lm import _context_parts
    from brickwork.bench.lm_rows import calibration, mean_losses
    from brickwork.compress import prune_model

    torch.set_num_threads(args.threads)
    cfg = LT.QUICK if args.quick else LT.FULL
    texts, skipped = LD.load_domains(None, args.seed)
    models = LT.Models(cfg, texts, args.seed)
    t0 = time.perf_counter()
    models.prepare(jobs=args.jobs, bar=_bar)
    prep = time.perf_counter() - t0
    print(f"models ready in {prep:.0f} s (cache hits {models.hits})", flush=True)
    _, ev, _ = _context_parts(models, texts, cfg, args.seed)
    calib = calibration(models, CALIB_SEQS)
    base = mean_losses(ev.losses(models.load(models.base_key), "test"))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for d, key in models.keys.items():
            ft_dir = models.dir(key)
            ft = mean_losses(ev.losses(models.load(key), "test", [d]))[d]
            cal = Path(tmp) / f"calib-{d}.safetensors"
            save_file({"input_ids": calib[d]}, str(cal))
            rows.append({"domain": d, "method": "dense", "pattern": "-", "loss": ft,
                         "base_loss": base[d], "gain_kept": 1.0})  # fmt: skip
            for label, pat in PATTERNS:
                for method in METHODS:
                    out = Path(tmp) / f"{d}-{method}-{label.replace(':', '_').replace('%', '')}"
                    t = time.perf_counter()
                    prune_model(ft_dir, out, method=method, data=[] if method == "magnitude"
                                else [cal], n_examples=CALIB_SEQS, **pat)  # fmt: skip
                    sec = time.perf_counter() - t
                    from transformers import AutoModelForCausalLM

                    m = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
                    loss = mean_losses(ev.losses(m, "test", [d]))[d]
                    rec = json.loads((out / "brickwork.json").read_text())
                    gain = (base[d] - loss) / (base[d] - ft) if base[d] != ft else float("nan")
                    rows.append({
                        "domain": d, "method": method, "pattern": label, "loss": loss,
                        "base_loss": base[d], "gain_kept": gain, "seconds": round(sec, 2),
                        "measured_sparsity": rec["measured_sparsity"]["overall"],
                    })  # fmt: skip
                    print(f"{d:10s} {method:9s} {label:4s} loss {loss:.4f} (base {base[d]:.4f}"
                          f", ft {ft:.4f}) gain kept {gain:6.1%} [{sec:.1f} s]", flush=True)  # fmt: skip
    return {
        "suite": "lm", "quick": args.quick, "seed": args.seed, "train_config": cfg.__dict__,
        "calibration_sequences": CALIB_SEQS, "skipped_domains": skipped,
        "prepare_seconds": round(prep, 1), "rows": rows,
    }  # fmt: skip


_CHILD = r"""
import sys, time
from pathlib import Path
def rss(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
import torch, transformers, safetensors  # noqa
import brickwork.compress.prune as P
from brickwork.checkpoint.reader import open_checkpoint
base = rss("VmRSS")
t = time.perf_counter()
P.prune_model(sys.argv[1], sys.argv[2], method="magnitude", sparsity=0.5)
print(f"RESULT {base:.1f} {rss('VmHWM'):.1f} {time.perf_counter() - t:.2f}")
"""


def memory(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from merge_vs_mergekit import build_checkpoints

    from brickwork.arch import layer_name
    from brickwork.checkpoint.reader import open_checkpoint

    paths = build_checkpoints(args.workdir, args.size, Console())
    ck = open_checkpoint(paths["base"])
    per_layer: dict[str, int] = {}
    for n in ck.names:
        ln = layer_name(n)
        if ln is not None:
            per_layer[f"{ln.prefix}{ln.index}"] = per_layer.get(f"{ln.prefix}{ln.index}", 0) + (
                ck.info(n).nbytes
            )
    layer_mb = max(per_layer.values()) / 2**20
    largest = max(ck.info(n).nbytes for n in ck.names) / 2**20
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-c", _CHILD, str(paths["base"]), str(Path(tmp) / "out")]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
        base_mb, peak_mb, sec = (float(v) for v in line.split()[1:])
    inc = peak_mb - base_mb
    res = {
        "size": args.size, "model": str(paths["base"]), "dtype": "bfloat16",
        "largest_layer_MB": round(layer_mb, 1), "largest_tensor_MB": round(largest, 1),
        "rss_after_imports_MB": base_mb, "peak_rss_MB": peak_mb,
        "peak_minus_imports_MB": round(inc, 1), "ratio_to_largest_layer": round(inc / layer_mb, 2),
        "prune_seconds": sec, "process_wall_seconds": round(wall, 1),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }  # fmt: skip
    print(json.dumps(res, indent=2))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    a = sub.add_parser("lm")
    a.add_argument("--quick", action="store_true")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--jobs", type=int, default=2, help="fine-tuning processes on a cache miss")
    a.add_argument("--threads", type=int, default=1)
    b = sub.add_parser("memory")
    b.add_argument("--size", default="0.5b")
    b.add_argument("--workdir", type=Path, default=ROOT / ".cache/brickwork/bench-merge")
    args = ap.parse_args(argv)
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    res = lm(args) if args.part == "lm" else memory(args)
    res["uptime_at_start"] = up
    stem = "compress_prune" if args.part == "lm" else "compress_prune_memory"
    stem += "_quick" if getattr(args, "quick", False) else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {RESULTS / stem}.json")


if __name__ == "__main__":
    main()
