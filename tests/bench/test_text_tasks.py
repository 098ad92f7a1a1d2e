"""The text suite's sources and tasks: labels parsed from known entries, splits of the full
(default) suite. Tests that need a Debian package skip, naming it, when it is missing
(``make debs`` installs them all)."""

from __future__ import annotations

import pytest

from brickwork.bench import data as D
from brickwork.bench import text_tasks as T
from brickwork.bench.suites import make_suite


def _missing(*packages: str) -> list[str]:
    out = []
    for p in packages:
        try:
            D.require(p)
        except D.MissingDataError:
            out.append(p)
    return out


def needs(*packages: str) -> pytest.MarkDecorator:
    missing = _missing(*packages)
    return pytest.mark.skipif(
        bool(missing), reason=f"Debian package(s) {' '.join(missing)} not installed (make debs)"
    )


ALL = sorted({p for spec in T.TASKS.values() for p in spec.source.split()})


@pytest.fixture(scope="module")
def gcide() -> dict[str, list[D.GcideEntry]]:
    by: dict[str, list[D.GcideEntry]] = {}
    for e in D.read_gcide():
        by.setdefault(e.headword, []).append(e)
    return by


@needs("dict-gcide")
def test_known_gcide_entries_have_their_labels(gcide):
    dog = gcide["Dog"][0]  # Dog \Dog\ (...), n. [AS. docga; ...]  1. (Zool.) A quadruped ...
    assert (dog.pos, dog.etym) == ("n.", "AS.")
    assert dog.senses[0].field == "Zool." and dog.senses[0].text.startswith("A quadruped of")
    assert dog.senses[2].usage == "Colloq." and "[" not in dog.senses[2].text
    assert gcide["Dog"][1].pos == "v. t."
    abacus = gcide["Abacus"][0]  # [L. abacus, abax, Gr. ...]; 1. ... [Obs.]; 3. (Arch.) ...
    assert (abacus.pos, abacus.etym) == ("n.", "L.")
    assert abacus.senses[0].usage == "Obs." and "Obs" not in abacus.senses[0].text
    assert abacus.senses[2].field == "Arch." and "(Arch.)" not in abacus.senses[2].text
    hydrogen = gcide["Hydrogen"][0]  # [Hydro-, 1 + -gen: cf. F. ...] (Chem.): no language first
    assert hydrogen.etym is None and hydrogen.senses[0].field == "Chem."
    assert hydrogen.senses[0].text.startswith("A gaseous element, colorless")
    abaft = gcide["Abaft"][0]  # the entry's field label applies to its senses
    assert (abaft.pos, abaft.senses[0].field) == ("prep.", "Naut.")
    assert gcide["Abbey"][0].etym == "OF."


@needs("dict-gcide")
def test_gcide_inputs_carry_no_label_and_no_wordnet_text(gcide):
    for entries in list(gcide.values())[::50]:
        for e in entries:
            for s in e.senses:
                assert s.field is None or f"({s.field})" not in s.text
                assert s.usage is None or f"[{s.usage}]" not in s.text
                assert "[" not in s.text and "{" not in s.text and "WordNet" not in s.text


@needs(*T._WORD_PACKAGES.split())
def test_known_words_are_in_their_language_list():
    assert "haus" in D.read_wordlist("german")  # "Haus", lowercased
    assert "huis" in D.read_wordlist("dutch")
    assert D.wordlist_members("polish", {"kobieta", "kitchen", "house"}) == {"kobieta", "house"}
    words = T.TextData().words()
    assert "huis" in D.wordlist_members("french", {"huis"})  # also French: left out
    assert "huis" not in words["dutch"]
    assert D.word_group("Café") == "cafe"
    suite = make_suite("text", quick=True, tasks=["word_language"])
    t = suite.task("word_language")
    words = {lang: set(ws) for lang, ws in words.items()}
    for w, y in zip(t.splits["test"].inputs, t.splits["test"].labels):
        assert [lang for lang, ws in words.items() if w in ws] == [t.classes[y]]  # only there
        others = [lang for lang in D.WORDLISTS if lang != t.classes[y]]
        assert not any(D.wordlist_members(lang, {w}) for lang in others[:2])


def test_groups_share_a_bucket_whatever_the_source():
    items = [(f"w{i % 97}", f"{src}{i}", "ab"[i % 2]) for src in "xy" for i in range(400)]
    a, b = (
        D.balanced_splits(
            [it for it in items if it[1][0] == src], source=src, key=lambda t: t[1],
            label=lambda t: t[2], classes=("a", "b"), per_class={"train": 20, "val": 2, "test": 4},
            seed=0, value=lambda t: t[1], group=lambda t: t[0],
        )
        for src in "xy"
    )  # fmt: skip
    for s in D.SPLITS:
        for o in D.SPLITS:
            if s != o:
                assert not set(a[s].groups) & set(b[o].groups)


@needs(*ALL)
def test_default_suite_eight_tasks_large_balanced_disjoint_deterministic():
    a = make_suite("text", seed=0)
    assert [t.name for t in a.tasks] == list(T.DEFAULT_TASKS) and len(a.tasks) == 8
    b = make_suite("text", seed=0, tasks=["gcide_pos"])
    assert a.task("gcide_pos").splits == b.task("gcide_pos").splits  # deterministic
    groups: dict[str, set[str]] = {s: set() for s in D.SPLITS}
    for t in a.tasks:
        assert len(t.splits["test"]) >= 1000, t.name
        assert t.source and t.source_version, t.name
        assert len(t.source.split()) == len(t.source_version.split())
        for s in D.SPLITS:
            sp = t.splits[s]
            counts = [sp.labels.count(i) for i in range(len(t.classes))]
            assert len(set(counts)) == 1 and counts[0] > 0, (t.name, s)
            assert len(set(sp.keys)) == len(sp), (t.name, s)  # no item twice
            assert len(sp.groups) == len(sp)
            groups[s] |= set(sp.groups)
    # a word's items are in one split in every task: no test word is a training word anywhere
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["val"]
    assert not groups["val"] & groups["test"]
    c = make_suite("text", seed=1, tasks=["word_pos"])
    assert c.task("word_pos").splits["test"].keys != a.task("word_pos").splits["test"].keys


def test_a_missing_package_skips_its_tasks_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "GCIDE_PATH", tmp_path / "gcide.dict.dz")
    if _missing("wordnet-base"):
        pytest.skip("Debian package wordnet-base not installed (make debs)")
    suite = make_suite("text", quick=True, tasks=["word_pos", "gcide_field", "gcide_pos"])
    assert [t.name for t in suite.tasks] == ["word_pos"]
    for name in ("gcide_field", "gcide_pos"):
        msg = suite.skipped[name]
        assert "\n" not in msg and "sudo apt-get install dict-gcide" in msg
    # the runner says it once for both tasks
    from brickwork.bench.runner import _group_skipped

    (why, names), *rest = _group_skipped(suite.skipped).items()
    assert names == ["gcide_field", "gcide_pos"] and not rest and "dict-gcide" in why


def test_package_versions_come_from_dpkg():
    if _missing("wordnet-base") or D.package_version("wordnet-base") is None:
        pytest.skip("Debian package wordnet-base not installed (make debs)")
    assert D.package_version("wordnet-base")[:1].isdigit()
    assert D.package_version("no-such-package-brickwork") is None
    source, version = T.source_of("word_pos")
    assert source == "wordnet-base" and version == D.package_version("wordnet-base")


@needs("dict-gcide")
def test_gcide_task_labels_are_the_dictionary_labels(gcide):
    names = ["gcide_pos", "gcide_etym", "gcide_usage", "word_field"]
    suite = make_suite("text", quick=True, tasks=names)
    by_lower: dict[str, list[D.GcideEntry]] = {}
    for head, entries in gcide.items():
        by_lower.setdefault(head.lower(), []).extend(entries)
    usages: dict[str, set[str]] = {}  # definition -> its usage labels (a text may recur)
    first: dict[str, set[str | None]] = {}  # first definition -> its entries' POS
    for e in (e for es in gcide.values() for e in es):
        for s in e.senses:
            usages.setdefault(s.text, set()).add(s.usage or "current")
        if e.senses:
            first.setdefault(e.senses[0].text, set()).add(e.pos)
    for split in D.SPLITS:
        pos, etym = suite.task("gcide_pos").splits[split], suite.task("gcide_etym").splits[split]
        usage, field = (
            suite.task("gcide_usage").splits[split],
            suite.task("word_field").splits[split],
        )
        classes = {n: suite.task(n).classes for n in names}
        for text, y in zip(pos.inputs, pos.labels):
            assert classes["gcide_pos"][y] in first[text]
        for word, y in zip(etym.inputs, etym.labels):
            assert {e.etym for e in by_lower[word] if e.etym} == {classes["gcide_etym"][y]}
        for text, y in zip(usage.inputs, usage.labels):
            assert classes["gcide_usage"][y] in usages[text]
        for word, y in zip(field.inputs, field.labels):
            fields = {s.field for e in by_lower[word] for s in e.senses if s.field}
            assert fields == {classes["word_field"][y]}


def test_syllables_and_accent_come_from_gcide_marks():
    assert D.syllables('Ab*ju"ra*to*ry', "Abjuratory") == (5, 2)
    assert D.syllables('As*so`ci*a"tion', "Association") == (5, 4)  # ` is the secondary accent
    assert D.syllables('Ab*jure"', "Abjure") == (2, 2)  # the accent mark ends the word
    assert D.syllables("Dog", "Dog") == (1, None)
    assert D.syllables('Ab*ju"ra*to*ry', "Abjure") is None  # letters are not the headword's
    assert D.syllables('Ac*cel"er*ate (-[=a]t)', "Accelerate") is None  # not plain marks


@needs("dict-gcide")
def test_known_gcide_spellings_give_their_syllables(gcide):
    assert gcide["Abjuratory"][0].spelling == 'Ab*ju"ra*to*ry'
    assert gcide["Abacus"][0].spelling == 'Ab"a*cus'
    suite = make_suite("text", quick=True, tasks=["word_syllables", "word_stress"])
    by_lower: dict[str, set[tuple[int, int | None]]] = {}
    for head, entries in gcide.items():
        for e in entries:
            got = D.syllables(e.spelling or "", head)
            if got:
                by_lower.setdefault(head.lower(), set()).add(got)
    for split in D.SPLITS:
        syl, acc = (
            suite.task("word_syllables").splits[split],
            suite.task("word_stress").splits[split],
        )
        for word, y in zip(syl.inputs, syl.labels):
            ((n, _),) = by_lower[word]  # one spelling: unambiguous words only
            assert T.SYLLABLES[y] == (str(n) if n < 6 else "6+")
        for word, y in zip(acc.inputs, acc.labels):
            ((n, a),) = by_lower[word]
            assert n > 1 and T.ACCENTS[y] == T.ACCENTS[min(a, 4) - 1]
