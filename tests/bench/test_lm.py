"""The LM suite's parts: tokenizer, splits, readers of the Debian sources, the metric."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brickwork.bench import lm_data as LD
from brickwork.bench.lm import score_rows, split_names
from brickwork.bench.stats import Bootstrap

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A program is a sequence of instructions for a computer.",
    "Abdication: the act of abdicating; the renunciation of a high office.",
    "Wer anderen eine Grube gräbt, fällt selbst hinein.",
] * 20


def test_tokenizer_training_is_deterministic():
    a = LD.train_tokenizer(TEXTS, 300)
    b = LD.train_tokenizer(TEXTS, 300)
    assert a.get_vocab() == b.get_vocab()
    ids = a(TEXTS[:4], add_special_tokens=False)["input_ids"]
    assert ids == b(TEXTS[:4], add_special_tokens=False)["input_ids"]
    assert a.decode(ids[3]) == TEXTS[3]  # byte-level: lossless, umlauts included
    assert a.eos_token == a.bos_token == LD.EOS and a.pad_token == LD.PAD


def _domain(docs):
    return LD.Domain("toy", "toy", ("none",), (LD.DICTD_DIR,), lambda: list(docs))


def test_splits_are_deterministic_disjoint_and_cover_every_document():
    docs = [f"document number {i} " * (1 + i % 3) for i in range(2000)] + ["duplicate"] * 5
    a, b = LD.split_domain(_domain(docs), 0), LD.split_domain(_domain(docs), 0)
    assert a.buckets == b.buckets and a.fingerprint() == b.fingerprint()
    sets = {k: set(v) for k, v in a.buckets.items()}
    for i, x in enumerate(LD.BUCKETS):
        for y in LD.BUCKETS[i + 1 :]:
            assert not sets[x] & sets[y], (x, y)
    assert set().union(*sets.values()) == set(docs)
    assert sum(len(v) for v in a.buckets.values()) == len(set(docs))  # duplicates once
    n = len(set(docs))
    assert 0.35 * n < len(a.buckets["pretrain"]) < 0.45 * n
    assert 0.12 * n < len(a.buckets["test"]) < 0.18 * n
    other = LD.split_domain(_domain(docs), 1)  # another seed: other buckets
    assert other.buckets["test"] != a.buckets["test"]


def test_held_out_sequences_hold_only_held_out_documents():
    docs = [f"entry {i}: " + " ".join(["word"] * (i % 7 + 3)) for i in range(600)]
    split = LD.split_domain(_domain(docs), 0)
    tok = LD.train_tokenizer(split.buckets["pretrain"], 300)
    seqs = LD.sequences(tok, split.buckets["test"], 16, 10_000)
    text = tok.decode([i for s in seqs for i in s])
    pieces = [p.strip() for p in text.split(LD.EOS) if p.strip()]
    train = set(split.buckets["pretrain"]) | set(split.buckets["finetune"])
    assert pieces and all(p not in train for p in pieces)
    assert all(p in split.buckets["test"] for p in pieces[1:-1])  # whole documents inside
    assert all(len(s) == 16 for s in seqs)
    assert seqs == LD.sequences(tok, split.buckets["test"], 16, 10_000)


def test_fortune_reader(tmp_path):
    (tmp_path / "topic").write_text("First  fortune\non two lines.\n%\nSecond.\n%\n")
    (tmp_path / "topic.dat").write_bytes(b"\0\1")
    assert LD.read_fortunes(tmp_path) == ["First fortune on two lines.", "Second."]


@pytest.mark.skipif(not (LD.DICTD_DIR / "gcide.index").exists(), reason="dict-gcide missing")
def test_gcide_reader_on_known_entries():
    docs = LD.read_dictd("gcide")
    assert len(docs) > 100_000
    abd = next(d for d in docs if d.startswith('Abdication \\Ab`di*ca"tion\\'))
    assert "The act of abdicating; the renunciation of a high office" in abd
    assert "[1913 Webster]" not in abd and "\n" not in abd
    assert not any(d.startswith("00-database") for d in docs[:10])


@pytest.mark.skipif(not (LD.DICTD_DIR / "foldoc.index").exists(), reason="dict-foldoc missing")
def test_foldoc_reader_on_a_known_entry():
    docs = LD.read_dictd("foldoc")
    actor = next(d for d in docs if d.startswith("actor 1. <programming>"))
    assert "which exists as a {concurrent} process" in actor


def test_a_missing_package_is_named():
    d = LD.Domain("x", "x", ("dict-nothing",), (LD.DICTD_DIR / "nothing.index",), list)
    assert "Debian package dict-nothing is not installed" in d.missing()


def _ref(method, kind, losses):
    return {"method": method, "kind": kind, "status": "ok", "vs_linear": None,
            "_losses": {d: np.asarray(v, dtype=float) for d, v in losses.items()}}  # fmt: skip


def test_normalized_metric_on_a_hand_case():
    """L_base = (3, 2), L_finetune = (2, 1), L_row = (2.5, 1.75): the row keeps
    (3 - 2.5) / (3 - 2) = 0.5 of the first gain and 0.25 of the second: 0.375."""
    n = 5
    rows = [
        _ref("base", "reference", {"a": [3.0] * n, "b": [2.0] * n}),
        _ref("individual", "reference", {"a": [2.0] * n, "b": [1.0] * n}),
        _ref("linear", "merge", {"a": [2.5] * n, "b": [1.75] * n}),
        _ref("ties", "merge", {"a": [2.25] * n, "b": [1.5] * n}),
    ]
    for r in rows:
        r.update(per_task={}, loss_per_task={}, avg=None, avg_ci=None, normalized=None,
                 normalized_ci=None, normalized_per_task={})  # fmt: skip
    score_rows(rows, Bootstrap({"a": n, "b": n}, n=50, seed=0))
    base, ind, lin, ties = rows
    assert base["normalized"] == 0.0 and ind["normalized"] == 1.0
    assert lin["normalized"] == pytest.approx(0.375)
    assert lin["normalized_per_task"] == {"a": 0.5, "b": 0.25}
    assert lin["normalized_ci"] == pytest.approx([0.375, 0.375])
    assert lin["per_task"]["a"] == pytest.approx(math.exp(2.5), abs=1e-4)
    assert lin["avg"] == pytest.approx(math.exp((2.5 + 1.75) / 2), abs=1e-4)
    assert ties["normalized"] == pytest.approx(0.625) and ties["vs_linear"] == "better"
    assert lin["vs_linear"] is None and base["vs_linear"] is None
    assert all("_losses" not in r for r in rows)


def test_normalized_interval_includes_the_references_noise():
    rng = np.random.default_rng(0)
    n = 200
    base = {"a": 3 + rng.normal(0, 0.3, n)}
    ft = {"a": base["a"] - 1 + rng.normal(0, 0.3, n)}
    row = {"a": base["a"] - 0.5 + rng.normal(0, 0.3, n)}
    rows = [_ref("base", "reference", base), _ref("individual", "reference", ft),
            _ref("linear", "merge", row)]  # fmt: skip
    for r in rows:
        r.update(per_task={}, loss_per_task={}, avg=None, avg_ci=None, normalized=None,
                 normalized_ci=None, normalized_per_task={})  # fmt: skip
    score_rows(rows, Bootstrap({"a": n}, seed=0))
    lo, hi = rows[2]["normalized_ci"]
    assert lo < rows[2]["normalized"] < hi and 0.3 < lo and hi < 0.7
    assert rows[1]["normalized_ci"] == [1.0, 1.0]


def test_method_names_split_into_merges_and_moe_routers():
    assert split_names(None, moe=True)[0] is None
    assert split_names(None, moe=False) == (None, [])
    assert split_names(["ties", "moe_task"], moe=True) == (["ties"], ["task"])
    with pytest.raises(Exception, match="moe_tusk"):
        split_names(["moe_tusk"], moe=True)
