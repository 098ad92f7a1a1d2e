"""Bench rows of the data-aware merges: statistics from training inputs only, AdaMerging
on unlabelled validation inputs, test read once per row, the statistics step recorded."""

from __future__ import annotations

import pytest

from brickwork.bench import data_rows as DR
from brickwork.bench.report import validate


@pytest.fixture(scope="module")
def aware(bench_cache, tmp_path_factory):
    from brickwork.bench import run_bench
    from brickwork.bench.evaluate import Evaluator

    used: list[tuple[str, str]] = []  # (task, split) of every calibration batch list
    calls: list[tuple[str, tuple[str, ...]]] = []
    mp = pytest.MonkeyPatch()
    real_batches, real_correct = DR.batches, Evaluator.correct

    def batches(suite, trainer, task, split, n, *size):
        used.append((task.name, split))
        return real_batches(suite, trainer, task, split, n, *size)

    def correct(self, state, heads, tasks, split):
        calls.append((split, tuple(t.name for t in tasks)))
        return real_correct(self, state, heads, tasks, split)

    mp.setattr(DR, "batches", batches)
    mp.setattr(Evaluator, "correct", correct)
    # a cache of its own: rows another test cached would be read back, never computed
    mp.setenv("BRICKWORK_CACHE", str(tmp_path_factory.mktemp("data-rows-cache")))
    out = tmp_path_factory.mktemp("data-rows")
    try:
        res = run_bench("digits", out=out, quick=True, moe=False, progress=False,
                        methods=["linear", "fisher", "adamerging", "regmean"])  # fmt: skip
    finally:
        mp.undo()
    return res, used, calls


def test_data_aware_rows_use_train_statistics_and_unlabelled_validation(aware):
    res, used, calls = aware
    validate(res)
    rows = {r["method"]: r for r in res["rows"]}
    fisher, ada = rows["fisher"], rows["adamerging"]
    assert fisher["status"] == ada["status"] == "ok"
    assert fisher["statistics"]["split"] == "train" and fisher["statistics"]["kinds"] == ["fisher"]
    assert ada["statistics"]["split"] == "val" and ada["statistics"]["kinds"] == []
    for r in (fisher, ada):
        assert r["statistics"]["seconds"] >= 0 and r["statistics"]["examples_per_model"] > 0
        assert r["statistics"]["peak_rss_mb"] is None or r["statistics"]["peak_rss_mb"] >= 0
    assert rows["linear"]["statistics"] is None
    assert {s for _, s in used} == {"train", "val"}  # never test inputs
    assert {t for t, s in used if s == "val"} == {t["name"] for t in res["tasks"]}  # adamerging
    # test is read once per data-aware row (each row: one call over every task)
    n_test = [c for c in calls if c[0] == "test" and len(c[1]) == len(res["tasks"])]
    assert len(n_test) >= 3  # linear, fisher, adamerging (+ base, multitask references)


def test_a_data_aware_row_that_cannot_run_says_why(aware):
    res, _, _ = aware
    reg = next(r for r in res["rows"] if r["method"] == "regmean")
    # quick digits: 64 calibration rows for a 784-wide input: a clear skip, not a crash
    assert reg["status"] == "skipped" and "784" in reg["reason"] and "rows" in reg["reason"]


def test_peak_rss_sees_memory_freed_before_the_block_ends():
    import torch

    with DR.PeakRSS() as r:
        x = torch.ones(25_000_000)  # 100 MB, touched
        del x
    if r.peak_mb is None:
        pytest.skip("no /proc/self/status on this system")
    assert r.peak_mb >= r.start_mb + 90
    with DR.PeakRSS() as quiet:
        pass
    assert quiet.peak_mb < quiet.start_mb + 50  # the high-water mark was reset on entry
