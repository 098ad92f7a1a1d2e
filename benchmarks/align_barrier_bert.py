"""The loss barrier between two small BERT encoders trained from different seeds on one bench
text task, before and after aligning B onto A (``brickwork.align`` with the Hugging Face spec).

Task: ``word_language`` of the text suite (a word -> which of 8 spelling lists it is in:
English, German, Dutch, Portuguese, Polish, French, Spanish, Italian), with the suite's own
splits (:func:`brickwork.bench.text_tasks.build`, seed 0: 12,000 train, 1,000 test words, no
test word in the training set). Tokenizer: character-level, trained offline with the
``tokenizers`` package on the training words (a WordPiece vocabulary of single characters
only, lowercased, accents kept), so the embedding is small (~100 rows instead of MiniLM's
30,522) and the model has to combine characters with its attention heads.

Models: two ``transformers.BertForSequenceClassification`` from one small ``BertConfig``
(default 4 layers, hidden 128, 4 heads, intermediate 512), random init from seeds 0 and 1,
each with its own batch order, float32. Along θ(α) = (1 − α) θ_A + α θ_B', α in 0, 0.05, ...,
1, for B' = B (naive), B weight-matched onto A over the FFN units only, over attention heads
and FFN units (heads as whole blocks, dimensions within a head), the same plus the residual
stream, and B activation-matched (heads + FFN, with and without the residual stream; 2,000
training words as calibration data), the test loss and accuracy are measured. The barrier is max over α of
loss(α) − ((1 − α) loss(0) + α loss(1)) (Ainsworth et al. 2023, Git Re-Basin,
arXiv:2209.04836; Frankle et al. 2020). Every B' is checked to compute B's function (the
largest |logit difference| on the test set is printed).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/align_barrier_bert.py
        # -> results/align_barrier_bert.{json,png}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import brickwork
from brickwork.bench import text_tasks as T

HERE = Path(__file__).resolve().parent
TASK = "word_language"


# ----------------------------------------------------------------------------- data


def char_tokenizer(texts: list[str]) -> Any:
    """A character-level WordPiece tokenizer trained on ``texts`` (no download): every
    character seen in training is a token, nothing longer (``limit_alphabet`` large and
    ``vocab_size`` = the alphabet, so no merges)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    alphabet = sorted({c for t in texts for c in t.lower()})
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=""))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one piece per char
    trainer = trainers.WordPieceTrainer(
        vocab_size=len(specials) + len(alphabet), special_tokens=specials,
        limit_alphabet=10_000, continuing_subword_prefix="",
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    tok.decoder = decoders.WordPiece(prefix="")
    return tok


def encode(tok: Any, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (n, max_len): [CLS] chars [SEP], padded."""
    cls, sep, pad = (tok.token_to_id(s) for s in ("[CLS]", "[SEP]", "[PAD]"))
    ids = torch.full((len(texts), max_len), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), max_len), dtype=torch.long)
    for i, enc in enumerate(tok.encode_batch(texts, add_special_tokens=False)):
        row = [cls, *enc.ids[: max_len - 2], sep]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- models


def bert_config(args: argparse.Namespace, vocab: int, labels: int, max_len: int) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.intermediate,
        max_position_embeddings=max_len, type_vocab_size=1, num_labels=labels,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        attn_implementation="eager",
    )  # fmt: skip


def new_model(config: Any) -> nn.Module:
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(config)


def train(config: Any, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, *, seed: int,
          epochs: int, batch: int, lr: float) -> nn.Module:  # fmt: skip
    """AdamW with linear warm-up (5 %) and linear decay; random init and batch order from
    ``seed``."""
    torch.manual_seed(seed)
    model = new_model(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(y) / batch)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm)))
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            width = int(mask[idx].sum(1).max())  # trim the batch's padding columns
            out = model(input_ids=ids[idx, :width], attention_mask=mask[idx, :width])
            loss = nn.functional.cross_entropy(out.logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [
            model(input_ids=i, attention_mask=m).logits
            for i, m in zip(ids.split(500), mask.split(500))
        ]
    )


def evaluate(model: nn.Module, ids, mask, y) -> tuple[float, float]:
    out = logits(model, ids, mask)
    return nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def path(config, a: nn.Module, b: nn.Module, ids, mask, y, alphas: list[float]) -> dict:
    """Loss and accuracy along (1 − α) θ_A + α θ_B (floating tensors only; integer buffers
    such as ``position_ids`` are A's, equal in both)."""
    sa, sb = a.state_dict(), b.state_dict()
    m = new_model(config).eval()
    losses, accs = [], []
    for t in alphas:
        m.load_state_dict(
            {k: (1 - t) * sa[k] + t * sb[k] if sa[k].is_floating_point() else sa[k] for k in sa}
        )
        loss, acc = evaluate(m, ids, mask, y)
        losses.append(loss)
        accs.append(acc)
    barrier = max(loss - ((1 - t) * losses[0] + t * losses[-1]) for t, loss in zip(alphas, losses))
    return {"loss": losses, "accuracy": accs, "barrier": barrier}


# ----------------------------------------------------------------------------- main

#: name -> (method, options passed to brickwork.align)
ALIGNMENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "weight (FFN only)": ("weight", {"heads": False, "within_head": False, "residual": False}),
    "weight (heads + FFN)": ("weight", {"heads": True, "within_head": True, "residual": False}),
    "weight (+ residual)": ("weight", {"heads": True, "within_head": True, "residual": True}),
    "activation (heads + FFN)": (
        "activation", {"heads": True, "within_head": True, "residual": False},
    ),
    "activation (+ residual)": (
        "activation", {"heads": True, "within_head": True, "residual": True},
    ),
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-len", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--naive-only", action="store_true", help="skip the alignments")
    ap.add_argument("--models", type=Path, default=None,
                    help="cache the two trained models' weights in this folder (reused when "
                    "the settings match)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=HERE / "results" / "align_barrier_bert")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    splits = T.build(TASK, T.TextData(), quick=False, seed=0)
    train_s, test_s = splits["train"], splits["test"]
    tok = char_tokenizer(list(train_s.inputs))
    ids, mask = encode(tok, list(train_s.inputs), args.max_len)
    y = torch.tensor(train_s.labels)
    ids_te, mask_te = encode(tok, list(test_s.inputs), args.max_len)
    y_te = torch.tensor(test_s.labels)
    classes = T.TASKS[TASK].classes
    config = bert_config(args, tok.get_vocab_size(), len(classes), args.max_len)

    t0 = time.perf_counter()
    models = []
    key = f"L{args.layers}-H{args.hidden}-A{args.heads}-I{args.intermediate}-e{args.epochs}"
    key += f"-b{args.batch}-lr{args.lr}-len{args.max_len}"
    for seed in (0, 1):
        cached = args.models / f"{key}-seed{seed}.pt" if args.models else None
        if cached is not None and cached.exists():
            model = new_model(config).eval()
            model.load_state_dict(torch.load(cached, weights_only=True))
        else:
            model = train(
                config, ids, mask, y, seed=seed, epochs=args.epochs, batch=args.batch, lr=args.lr
            )
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), cached)
        models.append(model)
        print(f"model {seed}: test loss/acc {evaluate(models[-1], ids_te, mask_te, y_te)}")
    a, b = models
    t_train = time.perf_counter() - t0
    alphas = [i / 20 for i in range(21)]
    half = alphas.index(0.5)
    curves: dict[str, dict] = {"naive": path(config, a, b, ids_te, mask_te, y_te, alphas)}
    seconds: dict[str, float] = {}
    logits_b = logits(b, ids_te, mask_te)
    calib = [
        {"input_ids": i, "attention_mask": m}
        for i, m in zip(ids[:2000].split(250), mask[:2000].split(250))
    ]  # activation matching: training inputs only
    if not args.naive_only:
        for name, (method, options) in ALIGNMENTS.items():
            t0 = time.perf_counter()
            try:
                aligned, _ = brickwork.align(
                    a, b, method=method, data=calib if method == "activation" else None,
                    seed=0, **options,
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001 - recorded, the other paths still run
                print(f"{name}: {type(e).__name__}: {e}")
                curves[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            seconds[name] = round(time.perf_counter() - t0, 2)
            diff = (logits(aligned, ids_te, mask_te) - logits_b).abs().max().item()
            print(f"{name}: max |logit(B') - logit(B)| on the test set = {diff:.2e}")
            curves[name] = path(config, a, aligned, ids_te, mask_te, y_te, alphas) | {
                "max_abs_logit_diff_vs_b": diff
            }
    naive = curves["naive"]["barrier"]
    measured = {k: c for k, c in curves.items() if "barrier" in c}
    result = {
        "task": TASK, "classes": list(classes), "train": len(train_s), "test": len(test_s),
        "tokenizer": f"character-level WordPiece, {tok.get_vocab_size()} tokens",
        "config": {k: getattr(config, k) for k in (
            "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings", "hidden_dropout_prob",
        )},
        "training": {"epochs": args.epochs, "batch": args.batch, "lr": args.lr,
                     "optimizer": "AdamW wd 0.01, 5 % warm-up, linear decay", "seeds": [0, 1]},
        "threads": args.threads, "train_seconds": round(t_train, 1), "align_seconds": seconds,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "alphas": alphas, "curves": curves,
        "barrier_removed": {k: 1 - c["barrier"] / naive for k, c in measured.items()
                            if k != "naive"},
        "accuracy_at_half": {k: c["accuracy"][half] for k, c in measured.items()},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (l1, l2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, c in measured.items():
        l1.plot(alphas, c["loss"], marker="o", ms=3, label=f"{name} (barrier {c['barrier']:.3f})")
        l2.plot(alphas, [100 * v for v in c["accuracy"]], marker="o", ms=3, label=name)
    l1.set(xlabel="α (0: model A, 1: model B)", ylabel="test loss", title="loss along the path")
    l2.set(xlabel="α", ylabel="test accuracy (%)", title="accuracy along the path")
    l1.legend(fontsize=8)
    l2.legend(fontsize=8)
    fig.suptitle(
        f"{args.layers}-layer BERT (hidden {args.hidden}) on {TASK}, two seeds: "
        "interpolation before and after alignment"
    )
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"{'path':<26}{'barrier':>9}{'removed':>10}{'acc at α=0.5':>14}")
    for name, c in measured.items():
        removed = "" if name == "naive" else f"{100 * result['barrier_removed'][name]:.1f} %"
        print(f"{name:<26}{c['barrier']:>9.4f}{removed:>10}{100 * c['accuracy'][half]:>13.1f}%")
    print(f"train {t_train:.1f} s (2 models); align {seconds}")


if __name__ == "__main__":
    main()
