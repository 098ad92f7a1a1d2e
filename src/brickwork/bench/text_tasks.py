"""The tasks of the ``text`` suite: which labelled items each one takes from which Debian
package, and how many per class (the table is in :mod:`brickwork.bench.suites`).

Every task over dictionary words and definitions buckets its items by the word they are
about (:func:`brickwork.bench.data.word_group`): all WordNet synsets, GCIDE entries and
word-list entries of one word fall in the same split in every task, so a test word of one
task is never a training word of another. Built splits are cached as JSON under
``$BRICKWORK_CACHE/bench/tasks/`` (reading GCIDE and the word lists takes seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import data as D

#: Bump when a change here or in the readers of :mod:`.data` changes a task's splits.
TASKS_VERSION = "text-tasks-4"

_NOUN_CLASSES = tuple(
    c for c in D.LEXNAMES if c.startswith("noun.") and c not in ("noun.Tops", "noun.motive")
)
_SMALL_VERBS = ("verb.weather", "verb.consumption", "verb.emotion")
_VERB_CLASSES = tuple(c for c in D.LEXNAMES if c.startswith("verb.") and c not in _SMALL_VERBS)
_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
_POS4 = ("noun", "verb", "adjective", "adverb")
GCIDE_FIELDS = ("Zool.", "Bot.", "Chem.", "Med.", "Anat.", "Naut.", "Min.", "Mus.")
GCIDE_ETYMS = ("L.", "F.", "OE.", "Gr.", "AS.", "NL.", "OF.")
GCIDE_POS = ("n.", "a.", "v. t.", "v. i.", "adv.")
GCIDE_USAGE = ("current", "Obs.", "R.")
WORD_FIELDS = GCIDE_FIELDS[:5]
#: ``v. i.`` has too few one-word headwords of that part of speech alone for 200 test items
HEADWORD_POS = ("n.", "a.", "v. t.", "adv.", "n. pl.")
SYLLABLES = ("1", "2", "3", "4", "5", "6+")
ACCENTS = ("1st", "2nd", "3rd", "4th+")
LANGUAGES = ("english", *D.WORDLISTS)
WORD_SAMPLE = 20_000  # words read per language list
_WORD_PACKAGES = " ".join(["wordnet-base", *(p for _, p in D.WORDLISTS.values())])


@dataclass(frozen=True)
class TaskSpec:
    classes: tuple[str, ...]
    sizes: tuple[int, int, int]  # per class: train, val, test
    quick: tuple[int, int, int]
    source: str  # the Debian package the labels come from
    description: str


TASKS: dict[str, TaskSpec] = {
    "noun_supersense": TaskSpec(_NOUN_CLASSES, (180, 5, 42), (4, 1, 1), "wordnet-base",
                                "WordNet noun gloss -> lexicographer file"),
    "verb_supersense": TaskSpec(_VERB_CLASSES, (200, 10, 84), (4, 1, 1), "wordnet-base",
                                "WordNet verb gloss -> lexicographer file"),
    "gloss_pos": TaskSpec(_POS4, (1000, 30, 250), (20, 4, 6), "wordnet-base",
                          "WordNet gloss -> part of speech of its synset"),
    "word_pos": TaskSpec(_POS4, (1000, 30, 250), (20, 4, 6), "wordnet-base",
                         "WordNet lemma -> part of speech"),
    "gcide_field": TaskSpec(GCIDE_FIELDS, (400, 15, 125), (10, 2, 3), "dict-gcide",
                            "GCIDE definition -> subject label"),
    "gcide_etym": TaskSpec(GCIDE_ETYMS, (500, 15, 143), (10, 2, 3), "dict-gcide",
                           "GCIDE headword -> language its etymology starts with"),
    "gcide_pos": TaskSpec(GCIDE_POS, (1000, 24, 200), (10, 2, 3), "dict-gcide",
                          "GCIDE definition -> part of speech"),
    "gcide_usage": TaskSpec(GCIDE_USAGE, (1000, 40, 334), (10, 2, 3), "dict-gcide",
                            "GCIDE definition -> current, [Obs.] or [R.]"),
    "word_field": TaskSpec(WORD_FIELDS, (600, 24, 200), (10, 2, 3), "dict-gcide",
                           "GCIDE headword -> subject label of its senses"),
    "headword_pos": TaskSpec(HEADWORD_POS, (500, 15, 200), (10, 2, 3), "dict-gcide",
                             "GCIDE headword -> part of speech (n. a. v. t. adv. n. pl.)"),
    "word_syllables": TaskSpec(SYLLABLES, (700, 20, 167), (10, 2, 3), "dict-gcide",
                               "GCIDE headword -> number of syllables"),
    "word_stress": TaskSpec(ACCENTS, (1000, 30, 250), (10, 2, 3), "dict-gcide",
                            "GCIDE headword -> syllable with the primary accent"),
    "word_language": TaskSpec(LANGUAGES, (1500, 15, 125), (10, 2, 3), _WORD_PACKAGES,
                              "word -> language of the spelling list it is in"),
}  # fmt: skip
#: The default suite. ``verb_supersense``, ``gcide_field``, ``gcide_etym``, ``gcide_usage``
#: and ``word_field`` are opt-in (``--tasks``): their fine-tunes gain less than 5 points over
#: the frozen probe (seed 0, 300 steps: +3.9, +3.1, +4.3, +4.0, +3.2).
DEFAULT_TASKS = (
    "noun_supersense", "gloss_pos", "word_pos", "gcide_pos", "headword_pos", "word_syllables",
    "word_stress", "word_language",
)  # fmt: skip


class TextData:
    """The sources of the text tasks, each read once and only when a task needs it."""

    def __init__(self) -> None:
        self._memo: dict[str, Any] = {}

    def _get(self, name: str, read: Callable[[], Any]) -> Any:
        if name not in self._memo:
            self._memo[name] = read()
        return self._memo[name]

    def synsets(self, *pos: str) -> list[D.Synset]:
        return [s for p in pos for s in self._get(f"wn:{p}", lambda p=p: D.read_wordnet(p))]

    def gcide(self) -> list[D.GcideEntry]:
        return self._get("gcide", D.read_gcide)

    def words(self) -> dict[str, list[str]]:
        """language -> words that are in its list and in no other (English: WordNet's
        one-word lowercase lemmas)."""

        def read() -> dict[str, list[str]]:
            lists = {lang: D.read_wordlist(lang, sample=WORD_SAMPLE) for lang in D.WORDLISTS}
            english = [
                w for s in self.synsets("noun", "verb", "adj", "adv") for w in s.words
                if D.WORD.fullmatch(w)
            ]  # fmt: skip
            lists = {"english": list(dict.fromkeys(english)), **lists}
            candidates = {w for ws in lists.values() for w in ws}
            member = {lang: D.wordlist_members(lang, candidates) for lang in D.WORDLISTS}
            member["english"] = set(lists["english"])
            groups: dict[str, int] = {}
            for ws in lists.values():
                for g in {D.word_group(w) for w in ws}:
                    groups[g] = groups.get(g, 0) + 1

            def unique(w: str) -> bool:  # in one list only, also when accents are stripped
                return sum(w in m for m in member.values()) == 1 and groups[D.word_group(w)] == 1

            return {lang: [w for w in ws if unique(w)] for lang, ws in lists.items()}

        return self._get("words", read)


def build(name: str, data: TextData, *, quick: bool, seed: int) -> dict[str, D.Split]:
    """The splits of task ``name`` (cached on disk)."""
    spec = TASKS[name]
    for package in _packages(name):
        D.require(package)  # before the cache: a missing package skips the task
    per_class = dict(zip(D.SPLITS, spec.quick if quick else spec.sizes))
    key = hashlib.sha256(
        json.dumps([TASKS_VERSION, name, seed, per_class, spec.classes, _versions(name)]).encode()
    ).hexdigest()[:20]
    path = _cache_dir() / f"{name}-{key}.json"
    if path.exists():
        raw = json.loads(path.read_text())
        return {
            s: D.Split(tuple(v[0]), tuple(v[1]), tuple(v[2]), tuple(v[3])) for s, v in raw.items()
        }
    splits = _BUILDERS[name](data, spec.classes, per_class, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump({s: [sp.inputs, sp.labels, sp.keys, sp.groups] for s, sp in splits.items()}, f)
    os.replace(tmp, path)
    return splits


def _cache_dir() -> Path:
    return Path(os.environ.get("BRICKWORK_CACHE", ".cache/brickwork")) / "bench" / "tasks"


def _packages(name: str) -> list[str]:
    return TASKS[name].source.split()


def _versions(name: str) -> list[str | None]:
    """Installed versions of every package task ``name`` reads (they enter its cache key)."""
    return [D.package_version(p) for p in _packages(name)]


def source_of(name: str) -> tuple[str, str | None]:
    """``(source, source_version)`` of :class:`~brickwork.bench.suites.Task`: the Debian
    package(s) task ``name`` reads, space-separated, and their installed versions."""
    versions = _versions(name)
    if any(v is None for v in versions):
        return TASKS[name].source, None
    return TASKS[name].source, " ".join(v for v in versions if v)


# ----------------------------------------------------------------------------- builders

Builder = Callable[[TextData, Sequence[str], dict[str, int], int], dict[str, D.Split]]


def _split(items: Sequence[Any], classes: Sequence[str], per_class: dict[str, int], seed: int,
           *, source: str, key: Callable[[Any], str], label: Callable[[Any], str | None],
           value: Callable[[Any], str], group: Callable[[Any], str]) -> dict[str, D.Split]:  # fmt: skip
    return D.balanced_splits(
        items, source=source, key=key, label=label, classes=classes,
        per_class=per_class, seed=seed, value=value, group=group,
    )  # fmt: skip


def _wordnet(pos: Sequence[str], label: Callable[[D.Synset], str | None],
             text: Callable[[D.Synset], str] = lambda s: s.gloss) -> Builder:  # fmt: skip
    def build(data: TextData, classes: Sequence[str], per_class: dict[str, int], seed: int):
        return _split(
            data.synsets(*pos), classes, per_class, seed, source="wordnet",
            key=lambda s: f"{s.pos}{s.offset:08d}", label=label, value=text,
            group=lambda s: D.word_group(s.words[0]),
        )  # fmt: skip

    return build


def _gcide_field(data: TextData, classes: Sequence[str], per_class: dict[str, int], seed: int):
    items = [(e, i, s) for e in data.gcide() for i, s in enumerate(e.senses) if s.field]
    return _split(
        items, classes, per_class, seed, source="gcide", key=lambda t: f"{t[0].index}.{t[1]}",
        label=lambda t: t[2].field, value=lambda t: t[2].text,
        group=lambda t: D.word_group(t[0].headword),
    )  # fmt: skip


def _gcide_pos(data: TextData, classes: Sequence[str], per_class: dict[str, int], seed: int):
    items = [e for e in data.gcide() if e.senses and e.pos]
    return _split(
        items, classes, per_class, seed, source="gcide", key=lambda e: str(e.index),
        label=lambda e: e.pos, value=lambda e: e.senses[0].text,
        group=lambda e: D.word_group(e.headword),
    )  # fmt: skip


def _gcide_etym(data: TextData, classes: Sequence[str], per_class: dict[str, int], seed: int):
    labels: dict[str, set[str]] = {}
    for e in data.gcide():
        if e.etym and " " not in e.headword:
            labels.setdefault(e.headword.lower(), set()).add(e.etym)
    items = [(w, next(iter(ls))) for w, ls in labels.items() if len(ls) == 1]  # unambiguous
    return _split(
        items, classes, per_class, seed, source="gcide-etym", key=lambda t: t[0],
        label=lambda t: t[1], value=lambda t: t[0], group=lambda t: D.word_group(t[0]),
    )  # fmt: skip


def _gcide_usage(data: TextData, classes: Sequence[str], per_class: dict[str, int], seed: int):
    items = [(e, i, s) for e in data.gcide() for i, s in enumerate(e.senses)]
    return _split(
        items, classes, per_class, seed, source="gcide", key=lambda t: f"{t[0].index}.{t[1]}",
        label=lambda t: t[2].usage or "current", value=lambda t: t[2].text,
        group=lambda t: D.word_group(t[0].headword),
    )  # fmt: skip


def _word_field(data: TextData, classes: Sequence[str], per_class: dict[str, int], seed: int):
    labels: dict[str, set[str]] = {}
    for e in data.gcide():
        if " " not in e.headword:
            for s in e.senses:
                if s.field:
                    labels.setdefault(e.headword.lower(), set()).add(s.field)
    items = [(w, next(iter(ls))) for w, ls in labels.items() if len(ls) == 1]  # unambiguous
    return _split(
        items, classes, per_class, seed, source="gcide-word", key=lambda t: t[0],
        label=lambda t: t[1], value=lambda t: t[0], group=lambda t: D.word_group(t[0]),
    )  # fmt: skip


def _gcide_syllables(data: TextData) -> dict[str, tuple[int, int | None]]:
    """word -> (syllables, primary accent) for one-word GCIDE headwords whose entries all
    agree (a word spelt two ways, e.g. a noun and a verb stressed differently, is left out)."""
    seen: dict[str, set[tuple[int, int | None]]] = {}
    for e in data.gcide():
        if e.spelling and D.WORD.fullmatch(e.headword):
            got = D.syllables(e.spelling, e.headword)
            if got is not None:
                seen.setdefault(e.headword.lower(), set()).add(got)
    return {w: next(iter(v)) for w, v in seen.items() if len(v) == 1}


def _headword_pos(data: TextData, classes: Sequence[str], per_class: dict[str, int], seed: int):
    labels: dict[str, set[str]] = {}
    for e in data.gcide():
        if e.pos and D.WORD.fullmatch(e.headword):
            labels.setdefault(e.headword.lower(), set()).add(e.pos)
    items = [(w, next(iter(ls))) for w, ls in labels.items() if len(ls) == 1]  # unambiguous
    return _split(
        items, classes, per_class, seed, source="gcide-headword-pos", key=lambda t: t[0],
        label=lambda t: t[1], value=lambda t: t[0], group=lambda t: D.word_group(t[0]),
    )  # fmt: skip


def _word_syllables(data: TextData, classes: Sequence[str], per_class: dict[str, int], seed: int):
    items = [(w, str(n) if n < 6 else "6+") for w, (n, _) in _gcide_syllables(data).items()]
    return _split(
        items, classes, per_class, seed, source="gcide-syllables", key=lambda t: t[0],
        label=lambda t: t[1], value=lambda t: t[0], group=lambda t: D.word_group(t[0]),
    )  # fmt: skip


def _word_stress(data: TextData, classes: Sequence[str], per_class: dict[str, int], seed: int):
    items = [
        (w, ACCENTS[min(a, 4) - 1]) for w, (n, a) in _gcide_syllables(data).items() if n > 1 and a
    ]
    return _split(
        items, classes, per_class, seed, source="gcide-stress", key=lambda t: t[0],
        label=lambda t: t[1], value=lambda t: t[0], group=lambda t: D.word_group(t[0]),
    )  # fmt: skip


def _word_language(data: TextData, classes: Sequence[str], per_class: dict[str, int], seed: int):
    items = [(lang, w) for lang, ws in data.words().items() for w in ws]
    return _split(
        items, classes, per_class, seed, source="words", key=lambda t: t[1],
        label=lambda t: t[0], value=lambda t: t[1], group=lambda t: D.word_group(t[1]),
    )  # fmt: skip


_BUILDERS: dict[str, Builder] = {
    "noun_supersense": _wordnet(["noun"], lambda s: s.lexname),
    "verb_supersense": _wordnet(["verb"], lambda s: s.lexname),
    "gloss_pos": _wordnet(["noun", "verb", "adj", "adv"], lambda s: _POS[s.pos]),
    "word_pos": _wordnet(
        ["noun", "verb", "adj", "adv"], lambda s: _POS[s.pos], lambda s: s.words[0]
    ),
    "gcide_field": _gcide_field,
    "gcide_etym": _gcide_etym,
    "gcide_pos": _gcide_pos,
    "gcide_usage": _gcide_usage,
    "word_field": _word_field,
    "headword_pos": _headword_pos,
    "word_syllables": _word_syllables,
    "word_stress": _word_stress,
    "word_language": _word_language,
}
