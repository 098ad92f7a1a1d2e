from __future__ import annotations

import pytest

from brickwork.bench import MissingDataError
from brickwork.bench import data as D
from brickwork.bench.suites import make_suite

wordnet = pytest.mark.skipif(not D.WORDNET_DIR.exists(), reason="wordnet-base not installed")
fortunes = pytest.mark.skipif(not D.FORTUNES_DIR.exists(), reason="fortunes not installed")


@wordnet
def test_known_synsets_have_their_known_lexicographer_file():
    nouns = {s.offset: s for s in D.read_wordnet("noun")}
    verbs = {s.offset: s for s in D.read_wordnet("verb")}
    assert nouns[1740].words == ("entity",) and nouns[1740].lexname == "noun.Tops"
    assert verbs[1740].words[0] == "breathe" and verbs[1740].lexname == "verb.body"
    assert verbs[1740].gloss == "draw air into, and expel out of, the lungs"  # examples dropped
    dog = next(s for s in nouns.values() if s.words[0] == "dog" and "domesticated" in s.gloss)
    assert dog.lexname == "noun.animal"


@wordnet
def test_task_labels_are_the_wordnet_labels():
    suite = make_suite("text", quick=True, tasks=["noun_supersense", "gloss_pos", "word_pos"])
    by_gloss = {s.gloss: s.lexname for s in D.read_wordnet("noun")}
    t = suite.task("noun_supersense")
    for split in D.SPLITS:
        for text, y in zip(t.splits[split].inputs, t.splits[split].labels):
            assert by_gloss[text] == t.classes[y]
    pos = suite.task("gloss_pos")
    pos_of = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
    for key, y in zip(pos.splits["train"].keys, pos.splits["train"].labels):
        assert pos_of[key[0]] == pos.classes[y]  # key = pos letter + offset


@fortunes
def test_fortunes_are_read_by_topic_file_and_offensive_topics_are_refused():
    files = D.read_fortunes(["zippy", "platitudes"])
    assert len(files["zippy"]) > 400 and all(e and "\n" not in e for e in files["zippy"])
    assert any(e.startswith("Yow!") for e in files["zippy"])  # Zippy the Pinhead's line
    with pytest.raises(D.BrickworkError):
        D.read_fortunes(["ethnic"])
    with pytest.raises(D.BrickworkError):
        D.read_fortunes(["off/racism"])


@wordnet
def test_splits_are_disjoint_balanced_and_deterministic():
    names = ["noun_supersense", "verb_supersense", "gloss_pos", "word_pos"]
    a = make_suite("text", quick=True, seed=0, tasks=names)
    b = make_suite("text", quick=True, seed=0, tasks=names)
    c = make_suite("text", quick=True, seed=1, tasks=names)
    seen: dict[str, set[str]] = {s: set() for s in D.SPLITS}
    for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks):
        keys = {s: set(ta.splits[s].keys) for s in D.SPLITS}
        assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
        assert not keys["val"] & keys["test"]
        for s in D.SPLITS:
            assert ta.splits[s] == tb.splits[s]  # deterministic
            counts = [ta.splits[s].labels.count(i) for i in range(len(ta.classes))]
            assert len(set(counts)) == 1 and counts[0] > 0  # class-balanced
            seen[s] |= set(ta.splits[s].groups)
        assert ta.splits["test"].keys != tc.splits["test"].keys  # the seed matters
    # buckets are by word across tasks: no word is in one task's train split and another's test
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["val"]


def test_missing_debian_data_is_one_line_that_says_what_to_install(tmp_path):
    with pytest.raises(MissingDataError) as e:
        D.read_wordnet("noun", root=tmp_path / "wordnet")
    msg = str(e.value)
    assert "\n" not in msg and "sudo apt-get install wordnet-base" in msg
    with pytest.raises(MissingDataError, match="sudo apt-get install fortunes"):
        D.read_fortunes(root=tmp_path / "fortunes")


def test_suite_skips_tasks_whose_data_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "WORDNET_DIR", tmp_path / "nope")
    suite = make_suite("digits", quick=True)  # digits need no Debian package
    assert [t.name for t in suite.tasks] == ["digit", "rot90", "inverted", "mod4"]
    with pytest.raises(MissingDataError, match="apt-get install wordnet-base"):
        make_suite("text", quick=True, tasks=["word_pos", "noun_supersense"])


def test_hash_buckets_follow_the_documented_proportions():
    buckets = [D.bucket_of(D.item_hash(0, "x", i)) for i in range(20000)]
    for name, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(buckets.count(name) / len(buckets) - share) < 0.015
