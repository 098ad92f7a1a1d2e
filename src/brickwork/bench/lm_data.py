"""Text of the language-model suite (``brickwork bench --suite lm``), read offline.

Domains (one fine-tune each), all from Debian packages:

* ``gcide`` (``dict-gcide``, ``/usr/share/dictd/gcide.dict.dz``): dictionary entries of the
  GNU Collaborative International Dictionary of English (Webster 1913 and later).
* ``computing`` (``dict-foldoc``; ``dict-jargon`` added when installed): entries of the Free
  On-line Dictionary of Computing and the Jargon File.
* ``fortunes_en`` (``fortunes``): English fortunes of the topics in :data:`EN_TOPICS` (never
  the offensive ones, never another language's files installed next to them).
* ``fortunes_de`` (``fortunes-de``, ``/usr/share/games/fortunes/de``): German fortunes.

A document is one dictionary entry or one fortune, whitespace collapsed; identical documents
are kept once. Each document goes to one bucket by a SHA-256 hash of the seed, the domain and
its text: ``pretrain`` (40 %), ``finetune`` (40 %), ``val`` (5 %), ``test`` (15 %). The base
model trains on ``pretrain`` documents of every domain, each fine-tune on its domain's
``finetune`` documents; hyperparameters are chosen on ``val`` and scores read on ``test``, so
no held-out sequence ever contains a token of a training document. Sequences are documents
in hash order, tokenised, joined by the end-of-text token and cut into ``seq_len`` tokens.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DICTD_DIR = Path("/usr/share/dictd")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
EOS = "<|endoftext|>"
PAD = "<pad>"

#: English fortune files of the ``fortunes`` package used as text: no offensive topic, no
#: ASCII art, no files of other languages' packages that share the directory.
EN_TOPICS: tuple[str, ...] = (
    "computers", "cookie", "debian", "definitions", "disclaimer", "education", "food",
    "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie",
    "literature", "love", "magic", "medicine", "miscellaneous", "news", "paradoxum", "people",
    "perl", "pets", "platitudes", "politics", "pratchett", "riddles", "science",
    "songs-poems", "sports", "startrek", "tao", "wisdom", "work", "zippy",
)  # fmt: skip
#: German fortune files left out: ASCII art.
DE_SKIP = frozenset({"asciiart"})

BUCKETS: tuple[str, ...] = ("pretrain", "finetune", "val", "test")
_EDGES = (0.40, 0.80, 0.85)  # pretrain < .40 <= finetune < .80 <= val < .85 <= test


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    packages: tuple[str, ...]  # Debian packages; the first one is required
    paths: tuple[Path, ...]  # what must exist for each package, in the same order
    read: Callable[[], list[str]]

    def missing(self) -> str | None:
        """Why the domain cannot be read (the package to install), or None."""
        if not self.paths[0].exists():
            return (
                f"Debian package {self.packages[0]} is not installed ({self.paths[0]} missing; "
                f"apt-get install {self.packages[0]})"
            )
        return None


def _b64(s: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for ch in s:
        n = n * 64 + alphabet.index(ch)
    return n


def read_dictd(name: str) -> list[str]:
    """Every entry of ``/usr/share/dictd/NAME.dict.dz`` (dictzip is gzip-compatible) as one
    whitespace-collapsed string, in index order, without the ``00-database-*`` entries."""
    with gzip.open(DICTD_DIR / f"{name}.dict.dz") as f:
        data = f.read()
    seen: set[tuple[int, int]] = set()
    out = []
    for line in (DICTD_DIR / f"{name}.index").read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00"):  # the database's own entries
            continue
        span = (_b64(parts[1]), _b64(parts[2]))
        if span in seen:
            continue
        seen.add(span)
        text = data[span[0] : span[0] + span[1]].decode("utf-8", errors="replace")
        text = " ".join(text.replace("[1913 Webster]", " ").replace("[PJC]", " ").split())
        if text:
            out.append(text)
    return out


def read_fortunes(directory: Path, names: Sequence[str] | None = None) -> list[str]:
    """The fortunes of ``directory`` (the files ``names``, or every file but ``.dat`` /
    ``.u8`` / :data:`DE_SKIP`), each whitespace-collapsed."""
    if names is None:
        names = sorted(
            p.name for p in directory.iterdir()
            if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
            and p.name not in DE_SKIP
        )  # fmt: skip
    out = []
    for n in names:
        p = directory / n
        if not p.is_file():
            continue
        for entry in p.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = " ".join(entry.replace("\n%", " ").split())
            if text and text != "%":
                out.append(text)
    return out


def _computing() -> list[str]:
    docs = read_dictd("foldoc")
    if (DICTD_DIR / "jargon.index").exists():
        docs += read_dictd("jargon")
    return docs


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("gcide", "GCIDE dictionary entries (English)", ("dict-gcide",),
               (DICTD_DIR / "gcide.index",), lambda: read_dictd("gcide")),
        Domain("computing", "FOLDOC and Jargon File entries (computing)",
               ("dict-foldoc", "dict-jargon"),
               (DICTD_DIR / "foldoc.index", DICTD_DIR / "jargon.index"), _computing),
        Domain("fortunes_en", "English fortunes", ("fortunes",),
               (FORTUNES_DIR / "fortunes",), lambda: read_fortunes(FORTUNES_DIR, EN_TOPICS)),
        Domain("fortunes_de", "German fortunes", ("fortunes-de",),
               (FORTUNES_DIR / "de",), lambda: read_fortunes(FORTUNES_DIR / "de")),
    )
}  # fmt: skip


def bucket_of(seed: int, domain: str, text: str) -> tuple[str, float]:
    """(bucket, hash in [0, 1)) of one document: the same on every machine."""
    h = hashlib.sha256(f"{seed}\0{domain}\0{text}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    for name, edge in zip(BUCKETS, _EDGES):
        if u < edge:
            return name, u
    return BUCKETS[-1], u


@dataclass(frozen=True)
class DomainText:
    """One domain's documents per bucket, each bucket in hash order."""

    domain: Domain
    buckets: dict[str, list[str]]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for b in BUCKETS:
            for t in self.buckets[b]:
                h.update(t.encode())
                h.update(b"\0")
            h.update(b"\1")
        return h.hexdigest()[:16]


def split_domain(domain: Domain, seed: int) -> DomainText:
    docs = dict.fromkeys(domain.read())  # identical documents once, first order kept
    keyed: dict[str, list[tuple[float, str]]] = {b: [] for b in BUCKETS}
    for text in docs:
        b, u = bucket_of(seed, domain.name, text)
        keyed[b].append((u, text))
    return DomainText(domain, {b: [t for _, t in sorted(v)] for b, v in keyed.items()})


def load_domains(
    names: Sequence[str] | None, seed: int
) -> tuple[dict[str, DomainText], dict[str, str]]:
    """(readable domains split into buckets, {skipped domain: one-line reason})."""
    from .data import MissingDataError

    wanted = list(DOMAINS) if names is None else list(names)
    unknown = [n for n in wanted if n not in DOMAINS]
    if unknown:
        raise MissingDataError(
            f"unknown LM domain(s) {', '.join(unknown)}; known: {', '.join(DOMAINS)}."
        )
    texts, skipped = {}, {}
    for n in wanted:
        why = DOMAINS[n].missing()
        if why:
            skipped[n] = why
        else:
            texts[n] = split_domain(DOMAINS[n], seed)
    return texts, skipped


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (``tokenizers``) trained on ``texts``, wrapped as a
    ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as BOS / EOS and ``<pad>``. Trained
    in one thread on the texts in the order given, so the same texts give the same vocab."""
    import os

    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None, pad_token=PAD
    )


def tokenizer_sample(texts: dict[str, DomainText], per_domain: int) -> list[str]:
    """The tokenizer's training text: the first ``per_domain`` pretrain documents of each
    domain (hash order), domains in order."""
    return [t for d in texts.values() for t in d.buckets["pretrain"][:per_domain]]


def sequences(tokenizer: Any, docs: Sequence[str], seq_len: int, n: int) -> list[list[int]]:
    """Up to ``n`` sequences of ``seq_len`` token ids: ``docs`` in order, each followed by
    the end-of-text token, concatenated and cut (the last partial sequence is dropped).
    Tokenises only as many documents as it needs."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    out: list[list[int]] = []
    buf: list[int] = []
    step = 256
    for s in range(0, len(docs), step):
        for ids in tokenizer(list(docs[s : s + step]), add_special_tokens=False)["input_ids"]:
            buf += ids + [eos]
        while len(buf) >= seq_len and len(out) < n:
            out.append(buf[:seq_len])
            buf = buf[seq_len:]
        if len(out) >= n:
            break
    return out
