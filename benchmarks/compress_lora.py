"""brickwork compress lora vs mergekit-extract-lora: agreement of B·A, wall time, peak RSS.

Uses the random Llama checkpoints of ``merge_vs_mergekit.py`` (base = BASE, ft1 = FINETUNE;
bfloat16, cached under ``--workdir``), runs both tools as separate processes at the same
rank with LoRA on every Linear and the embeddings (mergekit ``--embed-lora``), and compares
``B A`` module by module in float32. mergekit is a peer in its own venv, never a dependency:

    python3 -m venv /work/venv-mergekit && /work/venv-mergekit/bin/pip install torch==2.13.0
    /work/venv-mergekit/bin/pip install mergekit==0.1.5
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compress_lora.py --size tiny --rank 8
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compress_lora.py --size 0.5b --rank 32

Memory goal of issue 12: peak RSS ≤ 1.5 × the largest tensor set of one layer. The script
reports that set (bytes of one layer's tensors in the fine-tune, and in fine-tune + base),
the largest single tensor, and the RSS of a process that only imports torch + brickwork
(``baseline``), so the streamed part can be read off as peak − baseline.
Results: ``benchmarks/results/compress_lora_<size>.json`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_vs_mergekit import ROOT, build_checkpoints, run_tool  # noqa: E402

from brickwork.arch import layer_name  # noqa: E402
from brickwork.checkpoint.reader import open_checkpoint  # noqa: E402


def _ba(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> B·A (float32) in the orientation of the stored weight."""
    out = {}
    for k in sd:
        if k.endswith(".lora_A.weight"):
            m = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = sd[k.replace("lora_A", "lora_B")].float()
            out[m] = b @ sd[k].float()  # (out, in)
        elif k.endswith(".lora_embedding_A"):
            m = k.removeprefix("base_model.model.").removesuffix(".lora_embedding_A")
            b = sd[k.replace("lora_embedding_A", "lora_embedding_B")].float()
            out[m] = (b @ sd[k].float()).T  # (vocab, d)
    return out


def compare(ours: Path, theirs: Path, ft: Path, base: Path) -> dict[str, Any]:
    a = _ba(load_file(ours / "adapter_model.safetensors"))
    b = _ba(load_file(theirs / "adapter_model.safetensors"))
    fck, bck = open_checkpoint(ft), open_checkpoint(base)
    rows = {}
    for m in sorted(set(a) & set(b)):
        delta = fck.get(f"{m}.weight").float() - bck.get(f"{m}.weight").float()
        rows[m] = {
            "max_abs_diff": (a[m] - b[m]).abs().max().item(),
            "rel_fro_diff": (torch.linalg.matrix_norm(a[m] - b[m]) / torch.linalg.matrix_norm(a[m])).item(),
            "max_abs_delta": delta.abs().max().item(),
            "rel_err_ours": (torch.linalg.matrix_norm(delta - a[m]) / torch.linalg.matrix_norm(delta)).item(),
            "rel_err_mergekit": (torch.linalg.matrix_norm(delta - b[m]) / torch.linalg.matrix_norm(delta)).item(),
        }  # fmt: skip
    return {
        "modules_compared": len(rows),
        "only_ours": sorted(set(a) - set(b)),
        "only_mergekit": sorted(set(b) - set(a)),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows.values()),
        "max_rel_fro_diff": max(r["rel_fro_diff"] for r in rows.values()),
        "max_abs_delta": max(r["max_abs_delta"] for r in rows.values()),
        "max_rel_err_ours_minus_mergekit": max(
            r["rel_err_ours"] - r["rel_err_mergekit"] for r in rows.values()
        ),
        "per_module": rows,
    }


def layer_sets(ft: Path) -> dict[str, int]:
    ck = open_checkpoint(ft)
    per_layer: dict[int, int] = {}
    for n in ck.names:
        ln = layer_name(n)
        if ln is not None:
            per_layer[ln.index] = per_layer.get(ln.index, 0) + ck.info(n).nbytes
    return {
        "largest_layer_set_bytes": max(per_layer.values()),
        "largest_layer_set_ft_plus_base_bytes": 2 * max(per_layer.values()),
        "largest_tensor_bytes": max(i.nbytes for i in ck.infos()),
        "largest_tensor": max(ck.infos(), key=lambda i: i.nbytes).name,
    }


def float32_copy(src: Path, dst: Path) -> Path:
    """``src`` with every tensor in float32 (same values), so the agreement is not limited by
    bfloat16 storage of the adapters (both tools write A and B in the fine-tune's dtype)."""
    from safetensors.torch import save_file

    if (dst / "model.safetensors").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    ck = open_checkpoint(src)
    save_file({n: ck.get(n).float().contiguous() for n in ck.names}, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def agreement(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    """(a) the same tiny model in float32 through both tools at ``--agreement-rank``."""
    paths = build_checkpoints(args.workdir, "tiny", console)
    ft = float32_copy(paths["ft1"], args.workdir / "tiny-fp32" / "ft1")
    base = float32_copy(paths["base"], args.workdir / "tiny-fp32" / "base")
    out = args.workdir / f"lora-agree-r{args.agreement_rank}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    r = str(args.agreement_rank)
    run_tool([sys.executable, "-m", "brickwork.cli", "compress", "lora", str(ft), str(out / "ours"),
              "--base", str(base), "--rank", r, "-q"], out / "ours.log")  # fmt: skip
    run_tool([str(args.mergekit), "--model", str(ft), "--base-model", str(base), "--out-path",
              str(out / "mergekit"), "--max-rank", r, "--embed-lora"], out / "mergekit.log")  # fmt: skip
    agree = compare(out / "ours", out / "mergekit", ft, base)
    agree["per_module_head"] = dict(list(agree.pop("per_module").items())[:4])
    agree["rank"] = args.agreement_rank
    agree["dtype"] = "float32"
    console.print(json.dumps({k: v for k, v in agree.items() if k != "per_module_head"}, indent=1))
    return agree


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.5b", choices=["tiny", "0.1b", "0.5b"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache/brickwork/bench-merge")
    ap.add_argument(
        "--mergekit", type=Path, default=Path("/work/venv-mergekit/bin/mergekit-extract-lora")
    )
    ap.add_argument("--skip-mergekit", action="store_true", help="time brickwork only")
    ap.add_argument("--agreement-rank", type=int, default=8)
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args(argv)
    from rich.console import Console

    console = Console()
    agree = None if args.skip_mergekit else agreement(args, console)
    paths = build_checkpoints(args.workdir, args.size, console)
    ft, base = paths["ft1"], paths["base"]
    out = args.workdir / f"lora-{args.size}-r{args.rank}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env_py = sys.executable
    load = [os.getloadavg()[0]]
    runs: dict[str, Any] = {}
    base_cmd = [env_py, "-c", "import torch, brickwork.compress.lora, brickwork.cli"]
    w, c, rss, anon = run_tool(base_cmd, out / "baseline.log")
    runs["baseline_import"] = {"wall_s": w, "peak_rss_mb": rss, "command": base_cmd}
    ours = [env_py, "-m", "brickwork.cli", "compress", "lora", str(ft), str(out / "ours"),
            "--base", str(base), "--rank", str(args.rank), "-q"]  # fmt: skip
    w, c, rss, anon = run_tool(ours, out / "ours.log")
    runs["brickwork"] = {"wall_s": w, "cpu_s": c, "peak_rss_mb": rss, "peak_anon_mb": anon,
                         "command": ours}  # fmt: skip
    console.print(f"brickwork: {w:.1f}s, peak RSS {rss:.0f} MB")
    load.append(os.getloadavg()[0])
    result: dict[str, Any] = {"size": args.size, "rank": args.rank, "runs": runs}
    if not args.skip_mergekit:
        theirs = [str(args.mergekit), "--model", str(ft), "--base-model", str(base),
                  "--out-path", str(out / "mergekit"), "--max-rank", str(args.rank),
                  "--embed-lora"]  # fmt: skip
        w, c, rss, anon = run_tool(theirs, out / "mergekit.log")
        runs["mergekit"] = {"wall_s": w, "cpu_s": c, "peak_rss_mb": rss, "peak_anon_mb": anon,
                            "command": theirs}  # fmt: skip
        console.print(f"mergekit: {w:.1f}s, peak RSS {rss:.0f} MB")
        load.append(os.getloadavg()[0])
        same = compare(out / "ours", out / "mergekit", ft, base)
        same.pop("per_module")
        result["agreement_at_size_bfloat16"] = same
        console.print(json.dumps(same, indent=1))
    result["agreement_tiny_float32"] = agree
    sets = layer_sets(ft)
    peak = runs["brickwork"]["peak_rss_mb"] * 2**20
    streamed = peak - runs["baseline_import"]["peak_rss_mb"] * 2**20
    sets["goal_bytes"] = int(1.5 * sets["largest_layer_set_bytes"])
    sets["brickwork_peak_over_layer_set"] = peak / sets["largest_layer_set_bytes"]
    sets["brickwork_peak_minus_baseline_over_layer_set"] = (
        streamed / sets["largest_layer_set_bytes"]
    )
    sets["goal_met"] = peak <= sets["goal_bytes"]
    result["memory_goal"] = sets
    result["load_1min"] = load
    result["threads"] = os.environ.get("OMP_NUM_THREADS")
    result["torch"] = torch.__version__
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    console.print(json.dumps(sets, indent=1))
    res = (
        ROOT / "benchmarks/results" / f"compress_lora_{args.size}{args.tag and '_' + args.tag}.json"
    )
    res.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {res}")


if __name__ == "__main__":
    main()
