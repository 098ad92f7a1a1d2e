"""ZipIt and OT fusion of two tiny Llama LMs trained from different seeds (GCIDE text).

Two ``LlamaForCausalLM`` (2 layers, hidden 64, FFN 192, 4 query / 2 KV heads, byte-level BPE
of 512 tokens) are trained from seeds 0 and 1 on the same GCIDE ``pretrain`` sequences. Then,
through the model-file path (``brickwork.align.files.align_files``, what ``brickwork align``
runs), on held-out ``test`` sequences:

- A, B, and the naive average of their weights;
- B aligned onto A by weight matching (heads + FFN; and with the residual stream), by OT
  (EMD, weight cost; with the stream), each averaged with A;
- ZipIt (``--method zip``, calibration on ``finetune`` sequences): the zipped model, with
  the default alpha = beta = 0.5, with beta = 0, alpha = 0, and without merging heads.

Usage: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/align_zip_lm.py [--steps 600]``.
Writes ``benchmarks/results/align_zip_lm.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "align_zip_lm.json"


def _loss(model, seqs: torch.Tensor, batch: int = 32) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(seqs), batch):
            x = seqs[s : s + batch]
            n = x[:, 1:].numel()
            total += float(model(input_ids=x, labels=x).loss) * n
            count += n
    return total / count


def _average(a, b):
    import copy

    out = copy.deepcopy(a)
    sb = b.state_dict()
    out.load_state_dict({k: (v + sb[k]) / 2 for k, v in a.state_dict().items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from brickwork.align.files import AlignOptions, align_files
    from brickwork.bench.lm_data import load_domains, sequences, train_tokenizer
    from brickwork.bench.lm_train import train_lm
    from brickwork.recipe import DataSpec

    t_start = time.perf_counter()
    texts, skipped = load_domains(["gcide"], seed=0)
    if not texts:
        raise SystemExit(f"GCIDE text is not installed: {skipped}")
    d = texts["gcide"].buckets
    tok = train_tokenizer(d["pretrain"][:1500], 512)
    train = sequences(tok, d["pretrain"], 64, 4000)
    calib = torch.tensor(sequences(tok, d["finetune"], 64, 128))
    test = torch.tensor(sequences(tok, d["test"], 64, 256))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    models, train_s = {}, {}
    for name, seed in (("A", 0), ("B", 1)):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(cfg)
        t0 = time.perf_counter()
        train_lm(m, train, steps=args.steps, lr=3e-3, batch_size=16, warmup=0.05,
                 weight_decay=0.1, seed=seed)  # fmt: skip
        train_s[name] = round(time.perf_counter() - t0, 1)
        models[name] = m.eval()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, m in models.items():
            m.save_pretrained(root / name)
            tok.save_pretrained(root / name)
        save_file({"input_ids": calib}, root / "calib.safetensors")
        data = DataSpec(path=str(root / "calib.safetensors"), n_examples=128, max_length=64)
        a = models["A"]
        rows["A"] = {"test_loss": _loss(a, test)}
        rows["B"] = {"test_loss": _loss(models["B"], test)}
        rows["average(A, B)"] = {"test_loss": _loss(_average(a, models["B"]), test)}
        runs = {
            "weight matching": AlignOptions(method="weight", within_head=False),
            "weight matching + residual": AlignOptions(
                method="weight", within_head=False, residual=True
            ),
            "OT emd (weight cost)": AlignOptions(method="ot"),
            "OT emd (weight cost) + residual": AlignOptions(method="ot", residual=True),
            "OT emd (activation cost) + residual": AlignOptions(method="ot", residual=True),
            "zip": AlignOptions(method="zip"),
            "zip beta=0 (cross-model merges only)": AlignOptions(method="zip", beta=0.0),
            "zip alpha=0 (no repeated merges)": AlignOptions(method="zip", alpha=0.0),
            "zip without heads": AlignOptions(method="zip", heads=False),
        }
        for label, opt in runs.items():
            use_data = opt.method == "zip" or "activation" in label
            out = root / "".join(c if c.isalnum() else "_" for c in label)
            t0 = time.perf_counter()
            _, result = align_files(
                root / "A", root / "B", out, options=opt, data=data if use_data else None,
                progress=False,
            )  # fmt: skip
            seconds = round(time.perf_counter() - t0, 2)
            m = LlamaForCausalLM.from_pretrained(out).eval()
            if opt.method == "zip":
                rows[label] = {"test_loss": _loss(m, test), "seconds": seconds,
                               "calibration_loss": result.summary()["calibration_loss"]}  # fmt: skip
            else:
                same_b = abs(_loss(m, test) - rows["B"]["test_loss"])
                rows[f"average(A, B by {label})"] = {
                    "test_loss": _loss(_average(a, m), test),
                    "seconds": seconds,
                    "|loss(B') - loss(B)|": same_b,
                }
    record = {
        "config": cfg.to_dict() | {"steps": args.steps, "train_seqs": len(train)},
        "rows": rows,
        "train_seconds": train_s,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": 1,
        },  # fmt: skip
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    for k, v in rows.items():
        print(f"{k:55s} {v['test_loss']:.4f}")


if __name__ == "__main__":
    main()
