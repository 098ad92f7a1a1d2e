"""Low-rank factorisation of a small trained Llama LM: test loss vs parameter reduction.

One ``LlamaForCausalLM`` (4 layers, hidden 128, FFN 512, 4 query / 2 KV heads, byte-level
BPE of 512 tokens) is trained on GCIDE ``pretrain`` sequences. Then, through the file path
that ``brickwork compress lowrank`` runs (``compress_lowrank``), every Linear of the
transformer layers is factorised with ``--ratio 0.8`` and ``--ratio 0.6`` (keep 80 % / 60 %
of those layers' parameters, i.e. 20 % / 40 % reduction) by ``svd``, ``asvd`` and
``svd_llm`` (calibration: 128 ``finetune`` sequences of 64 tokens); the loaded result
(``brickwork.load``) is scored on 256 held-out ``test`` sequences.

Usage: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compress_lowrank.py [--steps 1500]``.
Writes ``benchmarks/results/compress_lowrank.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "compress_lowrank.json"


def _loss(model, seqs: torch.Tensor, batch: int = 32) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(seqs), batch):
            x = seqs[s : s + batch]
            n = x[:, 1:].numel()
            total += float(model(input_ids=x, labels=x).loss) * n
            count += n
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import brickwork
    from brickwork.bench.lm_data import load_domains, sequences, train_tokenizer
    from brickwork.bench.lm_train import train_lm
    from brickwork.compress import compress_lowrank

    t_start = time.perf_counter()
    texts, skipped = load_domains(["gcide"], seed=0)
    if not texts:
        raise SystemExit(f"GCIDE text is not installed: {skipped}")
    d = texts["gcide"].buckets
    tok = train_tokenizer(d["pretrain"][:1500], 512)
    train = sequences(tok, d["pretrain"], 64, 6000)
    calib = torch.tensor(sequences(tok, d["finetune"], 64, 128))
    test = torch.tensor(sequences(tok, d["test"], 64, 256))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    t0 = time.perf_counter()
    train_lm(model, train, steps=args.steps, lr=3e-3, batch_size=16, warmup=0.05,
             weight_decay=0.1, seed=0)  # fmt: skip
    train_s = round(time.perf_counter() - t0, 1)
    model.eval()
    rows: list[dict] = []
    dense_params = sum(p.numel() for p in model.parameters())
    rows.append({"method": "dense", "ratio": 1.0, "test_loss": _loss(model, test),
                 "model_params": dense_params})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "m")
        tok.save_pretrained(root / "m")
        save_file({"input_ids": calib}, root / "calib.safetensors")
        os.environ["BRICKWORK_CACHE"] = str(root / "cache")
        for ratio in (0.8, 0.6):
            for method in ("svd", "asvd", "svd_llm"):
                out = root / f"{method}_{ratio}"
                t0 = time.perf_counter()
                _, params = compress_lowrank(
                    root / "m", out, method=method, ratio=ratio,
                    data=[root / "calib.safetensors"] if method != "svd" else [],
                    n_examples=128, max_length=64,
                )  # fmt: skip
                seconds = round(time.perf_counter() - t0, 2)
                m = brickwork.load(out)
                rows.append(
                    {
                        "method": method,
                        "ratio": ratio,
                        "test_loss": _loss(m, test),
                        "seconds": seconds,
                        "layer_params_before": params["params_before"],
                        "layer_params_after": params["params_after"],
                        "model_params": params["model_after"],
                        "model_kept": params["model_after"] / dense_params,
                    }
                )
                print(rows[-1], flush=True)
    record = {
        "config": cfg.to_dict() | {"steps": args.steps, "train_seqs": len(train)},
        "rows": rows,
        "train_seconds": train_s,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for r in rows:
        print(f"{r['method']:8s} ratio {r['ratio']:.1f}  test loss {r['test_loss']:.3f}  "
              f"model params {r['model_params']:,}")  # fmt: skip


if __name__ == "__main__":
    main()
