"""Intervals, paired comparisons and the seeds summary through the runner's code path, on
rows built from known per-example correctness; the v3 schema; the charts."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from brickwork.bench import data as D
from brickwork.bench import report, stats
from brickwork.bench.evaluate import from_bits, to_bits
from brickwork.bench.runner import _finish, _row, load_cached_row, seed_summary
from brickwork.bench.suites import Task

N = 2000


def _task(name: str, n: int) -> Task:
    split = D.Split(tuple(range(n)), (0,) * n, tuple(str(i) for i in range(n)))
    return Task(name, ("a", "b"), {"train": split, "val": split, "test": split}, f"task {name}")


def _correct(n: int, right: int, seed: int) -> np.ndarray:
    c = np.arange(n) < right
    np.random.default_rng(seed).shuffle(c)
    return c


def _rows() -> tuple[list[dict], list[Task]]:
    """One task of 2,000 test examples; ``individual`` gets all right, so normalized =
    accuracy. ``linear`` 70 %; ``ties`` = linear with 60 wrong answers fixed (+3 points);
    ``dare_ties`` = linear with 60 right answers broken; ``karcher`` = linear exactly."""
    tasks = [_task("t", N)]
    lin = _correct(N, 1400, 0)
    better, worse = lin.copy(), lin.copy()
    better[np.flatnonzero(~lin)[:60]] = True
    worse[np.flatnonzero(lin)[:60]] = False
    rows = [
        _row("base", "reference", correct={"t": _correct(N, 1000, 1)}),
        _row("individual", "reference", correct={"t": np.ones(N, bool)}),
        _row("linear", "merge", correct={"t": lin}),
        _row("ties", "merge", correct={"t": better}),
        _row("dare_ties", "merge", correct={"t": worse}),
        _row("karcher", "merge", correct={"t": lin.copy()}),
        _row("moe_task", "moe", correct={"t": better.copy()}),
        _row("slerp", "merge", status="skipped", reason="two models only"),
    ]
    _finish(rows, tasks, seed=0)
    return rows, tasks


def test_intervals_and_vs_linear_from_known_per_example_vectors():
    rows, _ = _rows()
    by = {r["method"]: r for r in rows}
    lin = by["linear"]
    assert lin["avg"] == 0.7 and lin["normalized"] == 0.7
    # 0/1 at p = 0.7 on 2,000 examples: 0.7 ± 1.96 sqrt(0.7 · 0.3 / 2000) = ± 0.0201
    lo, hi = lin["normalized_ci"]
    assert lo < 0.7 < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(0.21 / N), rel=0.1)
    assert lin["avg_ci"] == lin["normalized_ci"]  # the individual row is right everywhere
    assert by["individual"]["normalized_ci"] == [1.0, 1.0]
    # +3 points on the same examples: better; -3: worse; identical: tie; the intervals of
    # the better row and linear overlap, only the paired comparison separates them
    assert by["ties"]["normalized_ci"][0] < hi
    assert [by[m]["vs_linear"] for m in ("ties", "dare_ties", "karcher", "moe_task")] == [
        "better",
        "worse",
        "tie",
        "better",
    ]
    assert [by[m]["vs_linear"] for m in ("base", "individual", "linear", "slerp")] == [None] * 4
    assert by["slerp"]["normalized_ci"] is None and by["slerp"]["avg_ci"] is None


def test_normalized_interval_includes_the_references_noise():
    # the individual row is wrong on 20 % of the examples: the ratio is recomputed against
    # the resampled individual row, so a row equal to it has the interval [1, 1] and a row
    # right on a subset of its examples has a ratio interval, not the accuracy interval
    tasks = [_task("t", 1000)]
    ind = _correct(1000, 800, 3)
    half = ind.copy()
    half[np.flatnonzero(ind)[::2]] = False  # right on half of individual's right answers
    rows = [
        _row("individual", "reference", correct={"t": ind}),
        _row("copy", "merge", correct={"t": ind.copy()}),
        _row("half", "merge", correct={"t": half}),
    ]
    _finish(rows, tasks, seed=0)
    assert rows[1]["normalized_ci"] == [1.0, 1.0]
    assert rows[2]["normalized"] == 0.5
    lo, hi = rows[2]["normalized_ci"]
    assert lo < 0.5 < hi
    # the ratio of two resampled means; its delta-method SE is sqrt(p(1-p)/n_ind) with
    # p = 0.5 the share of individual's 800 right answers kept: 0.0177, ± 0.0347
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(0.25 / 800), rel=0.15)
    assert rows[1]["vs_linear"] is None  # no linear row: nothing to compare with


def test_bits_round_trip_and_cached_rows_without_them_are_recomputed(tmp_path, monkeypatch):
    from brickwork.bench.train import save_row

    c = _correct(37, 20, 0)
    assert np.array_equal(from_bits(to_bits(c)), c) and to_bits(c).count("1") == 20
    monkeypatch.setenv("BRICKWORK_CACHE", str(tmp_path))
    rows, _ = _rows()
    save_row("new", rows[2])
    old = {k: v for k, v in rows[2].items() if k != "correct"}  # a brickwork-bench/2 row
    save_row("old", old)
    save_row("skipped", rows[-1])
    assert load_cached_row("new") == rows[2]
    assert load_cached_row("old") is None
    assert load_cached_row("skipped") == rows[-1]


def _results() -> dict:
    rows, tasks = _rows()
    return {
        "schema": report.SCHEMA_VERSION, "suite": "digits", "seed": 0, "train_seed": 0, "quick": True,
        "created": "2026-12-01T00:00:00+00:00",
        "tasks": [{"name": t.name, "description": t.description, "classes": list(t.classes),
                   "n_train": N, "n_val": N, "n_test": N, "source": "mnist",
                   "source_version": None} for t in tasks],
        "skipped_tasks": {}, "train_config": {}, "cache": {"hits": {}}, "rows": rows,
        "seeds": None,
        "environment": {"python": "3.11", "platform": "linux", "machine": "x86_64",
                        "processor": "cpu", "cpu_count": 2, "torch_threads": 1,
                        "packages": {"torch": "2.5"}},
        "wall_seconds": 1.0,
    }  # fmt: skip


def test_schema_v3_accepts_a_results_dict_and_rejects_missing_or_bad_new_fields():
    results = _results()
    report.validate(results)
    assert report.SCHEMA_VERSION == "brickwork-bench/4"
    for field in ("n_train", "n_val", "n_test", "source", "source_version"):
        assert field in report.SCHEMA_DOC

    def broken(change) -> dict:
        r = copy.deepcopy(results)
        change(r)
        return r

    cases = {
        "missing 'normalized_ci'": lambda r: r["rows"][2].pop("normalized_ci"),
        "missing 'avg_ci'": lambda r: r["rows"][2].pop("avg_ci"),
        "missing 'vs_linear'": lambda r: r["rows"][3].pop("vs_linear"),
        "normalized_ci: expected \\[lo, hi\\], got None": lambda r: r["rows"][2].update(
            normalized_ci=None
        ),
        "lo 0.8 > hi 0.7": lambda r: r["rows"][2].update(avg_ci=[0.8, 0.7]),
        "vs_linear: 'above'": lambda r: r["rows"][3].update(vs_linear="above"),
        "tasks\\[0\\]: missing 'n_test'": lambda r: r["tasks"][0].pop("n_test"),
        "unexpected key 'sizes'": lambda r: r["tasks"][0].update(sizes={}),
        "1999 examples, the task has 2000": lambda r: r["rows"][2]["correct"].update(
            t=r["rows"][2]["correct"]["t"][1:]
        ),
        "right, per_task says": lambda r: r["rows"][2]["per_task"].update(t=0.5),
        "missing 'seeds'": lambda r: r.pop("seeds"),
        "expected 2 values": lambda r: r.update(
            seeds={
                "values": [0, 1],
                "rows": {
                    "linear": {
                        "normalized": {"mean": 0.7, "std": None, "per_seed": [0.7]},
                        "avg": {"mean": 0.7, "std": None, "per_seed": [0.7, None]},
                    }
                },
            }  # fmt: skip
        ),
        "expected 'brickwork-bench/4'": lambda r: r.update(schema="brickwork-bench/3"),
    }
    for match, change in cases.items():
        with pytest.raises(report.ResultsSchemaError, match=match):
            report.validate(broken(change))


def test_seed_summary_is_mean_and_sample_std_per_row():
    runs = []
    for seed, (lin, ties) in enumerate([(0.70, 0.75), (0.72, 0.79), (0.74, None)]):
        rows = [{"method": "linear", "normalized": lin, "avg": lin - 0.1}]
        rows.append({"method": "ties", "normalized": ties, "avg": ties})
        runs.append({"seed": 0, "train_seed": seed, "rows": rows})
    s = seed_summary(runs)
    assert s["values"] == [0, 1, 2]
    assert s["rows"]["linear"]["normalized"] == {"mean": 0.72, "std": 0.02,
                                                 "per_seed": [0.7, 0.72, 0.74]}  # fmt: skip
    assert s["rows"]["linear"]["avg"]["mean"] == pytest.approx(0.62)
    # a row skipped in one seed: mean and std over the others, None in its place
    assert s["rows"]["ties"]["normalized"] == {
        "mean": 0.77,
        "std": round(float(np.std([0.75, 0.79], ddof=1)), 4),
        "per_seed": [0.75, 0.79, None],
    }
    assert stats.across_seeds([0.5]) == {"mean": 0.5, "std": None, "per_seed": [0.5]}
    assert stats.across_seeds([None]) == {"mean": None, "std": None, "per_seed": [None]}


def test_markdown_shows_intervals_comparisons_and_seeds():
    results = _results()
    results["seeds"] = seed_summary([results, results])
    report.validate(results)
    md = report.markdown(results)
    head = next(line for line in md.splitlines() if line.startswith("| method"))
    for c in ("avg 95 % CI", "normalized 95 % CI", "vs linear"):
        assert f"| {c} |" in head
    lin = next(r for r in results["rows"] if r["method"] == "linear")
    lo, hi = lin["normalized_ci"]
    assert f"| 70.0 | {100 * lo:.1f}–{100 * hi:.1f} |" in md
    assert "worse: `dare_ties`; indistinguishable: `karcher`; better: `ties`, `moe_task`." in md
    assert (
        "Across training seeds 0, 0" in md
        and "| `linear` | 70.0 ± 0.0 | 70.0 ± 0.0 | 70.0 | 70.0 |" in md
    )
    assert f"`t` (2 classes): task t; {N} / {N} / {N}; mnist" in md
    console = Console(width=80, file=io.StringIO(), record=True)
    report.print_table(results, console, out=Path("out"))
    text = " ".join(console.export_text().split())
    assert (
        "this table: training seed 0; mean ± std over training seeds 0, 0: out/results.md" in text
    )


def test_charts_are_written(tmp_path):
    from brickwork.bench.charts import normalized_chart, params_chart

    results = _results()
    for r in results["rows"]:
        r["active_params"] = None if r["status"] != "ok" else 1000 * (1 + (r["kind"] == "moe"))
    normalized_chart(results, tmp_path / "n.png")
    params_chart(results, tmp_path / "p.png")
    for name in ("n.png", "p.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
