"""Agreement with mergekit for nuslerp, multislerp, sce, nearswap, arcee_fusion, ram and
ramplus_tl: the same mergekit YAML through ``mergekit-yaml`` and ``brickwork merge``.

Builds tiny random Llama checkpoints (a base and three fine-tunes, from a transformers
``LlamaConfig``, no download) as float32 safetensors, writes one mergekit recipe per
method variant and recipe ``dtype`` (float32, bfloat16), runs both tools as separate
processes and compares every output tensor: largest |difference| and differing elements.

    .venv/bin/python benchmarks/agreement_mergekit_methods.py
    .venv/bin/python benchmarks/agreement_mergekit_methods.py --recipes sce,ram --dtypes bfloat16

Results: ``benchmarks/results/agreement_mergekit_methods.{json,md}`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
FINETUNES = ("ft1", "ft2", "ft3")


def _gen(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(":".join(map(str, key)).encode()))


def build_models(root: Path, store: torch.dtype = torch.float32) -> dict[str, Path]:
    """A random base and three fine-tunes. Fine-tune j changes a random 60 % of the entries
    (so RAM sees entries changed by one, several or no models) by a low-rank part plus noise;
    some changes are below 1e-3 (nearswap's t, RAM's epsilon variants)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**CONFIG)
    cfg.architectures = ["LlamaForCausalLM"]
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    paths = {m: root / m for m in ("base", *FINETUNES)}
    base = {}
    for name, shape in shapes.items():
        g = _gen("base", name)
        base[name] = (
            1 + 0.05 * torch.randn(shape, generator=g)
            if len(shape) == 1
            else 0.02 * torch.randn(shape, generator=g)
        )
    models = {"base": base}
    for j, ft in enumerate(FINETUNES, start=1):
        sd = {}
        for name, shape in shapes.items():
            g = _gen(ft, name)
            noise = torch.randn(shape, generator=g)
            if len(shape) == 2:
                u, v = torch.randn(shape[0], 8, generator=g), torch.randn(8, shape[1], generator=g)
                noise = 0.7 * noise + 0.7 * (u @ v) / 8**0.5
            keep = torch.rand(shape, generator=g) < 0.6
            scale = 0.002 * (1 + 0.5 * j) * (2 if len(shape) == 1 else 1)
            sd[name] = base[name] + scale * noise * keep
        models[ft] = sd
    for m, p in paths.items():
        p.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(p)
        sd = {k: v.to(store) for k, v in models[m].items()}
        save_file(sd, str(p / "model.safetensors"), metadata={"format": "pt"})
    return paths


def recipes(p: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Method variants: name → mergekit recipe without ``dtype``."""

    def models(*names: str, **params: Any) -> list[dict[str, Any]]:
        out = []
        for i, n in enumerate(names):
            prm = {k: (v[i] if isinstance(v, list) else v) for k, v in params.items()}
            out.append({"model": p[n], **({"parameters": prm} if prm else {})})
        return out

    three = ("ft1", "ft2", "ft3")
    return {
        "nuslerp": {
            "merge_method": "nuslerp",
            "models": models("ft1", "ft2", weight=[0.4, 0.6]),
        },
        "nuslerp_base_rows": {
            "merge_method": "nuslerp",
            "base_model": p["base"],
            "models": models("ft1", "ft2", weight=[0.7, 0.3]),
            "parameters": {"nuslerp_flatten": False},
        },
        "nuslerp_base_columns": {
            "merge_method": "nuslerp",
            "base_model": p["base"],
            "models": models("base", "ft1", "ft2", weight=[1.0, 0.5, 0.5]),
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        },
        "multislerp": {
            "merge_method": "multislerp",
            "models": models(*three, weight=[0.5, 0.3, 0.2]),
        },
        "multislerp_base": {
            "merge_method": "multislerp",
            "base_model": p["base"],
            "models": models(*three, weight=[1.0, 2.0, 1.0]),
            "parameters": {"normalize_weights": True},
        },
        "sce": {"merge_method": "sce", "base_model": p["base"], "models": models(*three)},
        "sce_topk": {
            "merge_method": "sce",
            "base_model": p["base"],
            "models": models(*three),
            "parameters": {"select_topk": 0.3},
        },
        "sce_int8_mask": {
            "merge_method": "sce",
            "base_model": p["base"],
            "models": models(*three),
            "parameters": {"select_topk": 0.6, "int8_mask": True},
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": p["base"],
            "models": models("ft1"),
            "parameters": {"t": 0.001},
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": p["base"],
            "models": models("base", "ft2"),
        },
        "ram": {"merge_method": "ram", "base_model": p["base"], "models": models(*three)},
        "ram_eps": {
            "merge_method": "ram",
            "base_model": p["base"],
            "models": models(*three),
            "parameters": {"epsilon": 0.001},
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": p["base"],
            "models": models(*three),
        },
        "ramplus_tl_r": {
            "merge_method": "ramplus_tl",
            "base_model": p["base"],
            "models": models(*three),
            "parameters": {"r": 0.5, "alpha": 0.4, "epsilon": 0.001},
        },
    }


def compare(a_dir: Path, b_dir: Path, base: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Differences of brickwork's output ``a_dir`` from mergekit's ``b_dir``, and the share of
    brickwork's entries that differ from the base (so that agreement is not agreement on
    an output that equals its input)."""
    a, b = _load_dir(a_dir), _load_dir(b_dir)
    if set(a) != set(b):
        return {"error": f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}"}
    res: dict[str, Any] = {"tensors": len(a), "elements": 0, "differing": 0, "max_abs_diff": 0.0}
    res |= {"worst_tensor": None, "dtypes": sorted({str(t.dtype) for t in b.values()})}
    res["brickwork_dtypes"] = sorted({str(t.dtype) for t in a.values()})
    moved = 0
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            return {"error": f"{name}: shape {list(x.shape)} vs {list(y.shape)}"}
        if x.dtype != y.dtype:
            res.setdefault("dtype_mismatch", f"{name}: {x.dtype} vs {y.dtype}")
        moved += int((x != base[name].to(x.dtype)).sum())
        x, y = x.double(), y.double()
        ne = ~((x == y) | (x.isnan() & y.isnan()))
        res["elements"] += x.numel()
        if int(ne.sum()):
            res["differing"] += int(ne.sum())
            d = float((x - y).abs()[ne].max())
            if d > res["max_abs_diff"]:
                res["max_abs_diff"], res["worst_tensor"] = d, name
    res["moved_from_base"] = round(moved / res["elements"], 4)
    return res


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def _dtypes(d: dict[str, Any]) -> str:
    mk, bw = ", ".join(d["dtypes"]), ", ".join(d["brickwork_dtypes"])
    return mk if mk == bw else f"mergekit {mk}, brickwork {bw}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# brickwork vs mergekit: nuslerp, multislerp, sce, nearswap, arcee_fusion, ram, ramplus_tl",
        "",
        f"Measured {result['date']} with `{result['command']}`; mergekit {result['mergekit']}, "
        f"brickwork {result['brickwork']}, torch {result['torch']}. Models: {result['models']}.",
        "",
        "| recipe | `dtype` | max abs diff | differing elements | output dtype | entries ≠ base |"
        + ("" if result["out_dtype"] else " (recipes without `out_dtype`)"),
        "| --- | --- | ---: | ---: | --- | ---: |",
    ]
    for r in result["rows"]:
        d = r["diff"]
        if "error" in d:
            lines.append(f"| {r['recipe']} | {r['dtype']} | error: {d['error']} | | |")
            continue
        lines.append(
            f"| {r['recipe']} | {r['dtype']} | {d['max_abs_diff']:.3g} | "
            f"{d['differing']:,} / {d['elements']:,} | {_dtypes(d)} | "
            f"{100 * d['moved_from_base']:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache/brickwork/agreement-methods")
    ap.add_argument("--recipes", default="", help="comma-separated recipe names (default: all)")
    ap.add_argument(
        "--dtypes", default="float32,bfloat16",
        help="recipe `dtype:` values; `none`: no dtype (each tool computes in the stored dtype)",
    )  # fmt: skip
    ap.add_argument(
        "--store", default="float32", choices=["float32", "bfloat16"],
        help="dtype of the checkpoints",
    )  # fmt: skip
    ap.add_argument("--brickwork", type=Path, default=Path(sys.executable).parent / "brickwork")
    ap.add_argument("--mergekit", type=Path, default=ROOT / ".venv-mergekit/bin/mergekit-yaml")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    ap.add_argument(
        "--vocab", type=int, default=CONFIG["vocab_size"], help="over 15625 (hidden 64): the "
        "embedding and head exceed the 1,000,000 entries above which mergekit's arcee_fusion "
        "samples its quantiles at random",
    )  # fmt: skip
    ap.add_argument(
        "--no-out-dtype", action="store_true",
        help="recipes without out_dtype (mergekit then writes each tensor in the dtype it was "
        "computed in)",
    )  # fmt: skip
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument(
        "--models", type=Path, default=None,
        help="use DIR/base and DIR/ft1..ft3 instead of building tiny ones (e.g. "
        "merge_vs_mergekit.py's .cache/brickwork/bench-merge/0.1b)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    CONFIG["vocab_size"] = args.vocab
    shutil.rmtree(args.workdir, ignore_errors=True)
    if args.models is None:
        paths = build_models(args.workdir / "models", getattr(torch, args.store))
        described = (
            "random Llama, "
            + ", ".join(f"{k}={v}" for k, v in CONFIG.items() if k != "tie_word_embeddings")
            + f", {args.store} safetensors; base + 3 fine-tunes"
        )
    else:
        paths = {m: args.models / m for m in ("base", *FINETUNES)}
        described = f"{args.models} (base, ft1, ft2, ft3)"
    all_recipes = recipes({k: str(v) for k, v in paths.items()})
    names = args.recipes.split(",") if args.recipes else list(all_recipes)
    base = _load_dir(paths["base"])
    rows = []
    for dtype in args.dtypes.split(","):
        for name in names:
            work = args.workdir / "runs" / dtype / name
            work.mkdir(parents=True)
            rec = work / "recipe.yml"
            recipe = dict(all_recipes[name])
            if dtype != "none":
                recipe["dtype"] = dtype
                if not args.no_out_dtype:
                    recipe["out_dtype"] = dtype
            rec.write_text(yaml.safe_dump(recipe, sort_keys=False))
            bw, mk = work / "out-brickwork", work / "out-mergekit"
            t_bw = _run([str(args.brickwork), "merge", str(rec), str(bw), "-q"], work / "bw.log")
            t_mk = _run([str(args.mergekit), str(rec), str(mk), "--quiet"], work / "mk.log")
            diff = compare(bw, mk, base)
            rows.append({"recipe": name, "dtype": dtype, "diff": diff, "seconds": [t_bw, t_mk]})
            shown = diff.get("error") or (
                f"max |diff| {diff['max_abs_diff']:.3g}, "
                f"{diff['differing']:,} / {diff['elements']:,} differ"
            )
            print(f"{dtype:9} {name:22} {shown}", flush=True)
    mk_version = subprocess.run(
        [str(args.mergekit.parent / "python"), "-c", "import importlib.metadata as m; "
         "print(m.version('mergekit'))"], capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    from brickwork.checkpoint.provenance import version_string

    result = {
        "benchmark": "agreement_mergekit_methods",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/agreement_mergekit_methods.py", *sys.argv[1:]]),
        "mergekit": mk_version,
        "brickwork": version_string(),
        "torch": torch.__version__,
        "models": described,
        "out_dtype": not args.no_out_dtype,
        "recipes": {n: all_recipes[n] for n in names},
        "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / ("agreement_mergekit_methods" + (f"_{args.tag}" if args.tag else ""))
    stem.parent.joinpath(stem.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.parent.joinpath(stem.name + ".md").write_text(markdown(result))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
