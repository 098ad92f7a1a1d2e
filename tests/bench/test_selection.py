from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from brickwork.bench import data as D
from brickwork.bench.evaluate import Evaluator, grid, select_hyperparameters
from brickwork.bench.runner import _merge_rows
from brickwork.bench.suites import Task, make_suite
from brickwork.bench.train import Trainer
from brickwork.errors import BrickworkError


def test_grid_is_the_capped_cartesian_product():
    assert grid({}) == [{}]
    assert grid({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    big = grid({"a": list(range(5)), "b": list(range(4))}, cap=6)
    assert len(big) == 6 and big[0] == {"a": 0, "b": 0} and big[-1] == {"a": 4, "b": 3}


def test_selection_keeps_the_best_validation_average_and_records_failures():
    def merge(p):
        if p["x"] == 3:
            raise BrickworkError("x=3 cannot merge")
        return {"w": torch.tensor(float(p["x"]))}

    def score_val(state):
        x = float(state["w"])
        return {"a": 1 - abs(x - 2) / 10, "b": 0.5}

    sel = select_hyperparameters(grid({"x": [1, 2, 3]}), merge, score_val, errors=(BrickworkError,))
    assert sel.params == {"x": 2} and sel.error == "x=3 cannot merge"
    assert [t.get("error") for t in sel.tried] == [None, None, "x=3 cannot merge"]


def _poisoned(task: Task) -> Task:
    """The same task with shuffled test labels (and test inputs reversed)."""
    test = task.splits["test"]
    labels = list(test.labels)
    random.Random(1).shuffle(labels)
    bad = D.Split(tuple(reversed(test.inputs)), tuple(labels), test.keys)
    return replace(task, splits={**task.splits, "test": bad})


def test_hyperparameter_selection_never_reads_the_test_split(bench_cache):
    suite = make_suite("digits", quick=True)
    trainer = Trainer(suite)
    finetunes = {t.name: trainer.finetune(t) for t in suite.tasks}
    methods = ["task_arithmetic", "ties"]

    def run() -> tuple[list[dict], list[tuple[str, tuple[str, ...]]]]:
        ev = Evaluator(suite, trainer)
        rows = _merge_rows(
            suite, suite.tasks, ev, finetunes, methods, seed=0, progress=_no_bar, use_cache=False
        )
        return rows, ev.calls

    clean, calls = run()
    # per method: validation calls only, then exactly one test evaluation
    splits = [s for s, _ in calls]
    assert splits.count("test") == len(methods)
    assert all(s == "val" for s in splits[: splits.index("test")])
    suite.tasks = [_poisoned(t) for t in suite.tasks]
    trainer._prepared = {k: v for k, v in trainer._prepared.items() if k[1] != "test"}
    poisoned, _ = run()
    for a, b in zip(clean, poisoned):
        assert a["hyperparameters"] == b["hyperparameters"]
        assert a["validation"] == b["validation"]
    assert [a["per_task"] for a in clean] != [b["per_task"] for b in poisoned]
    # the per-example results (the intervals' input) come from that one test read
    assert [a["correct"] for a in clean] != [b["correct"] for b in poisoned]
    for r in poisoned:
        for t in suite.tasks:
            bits = r["correct"][t.name]
            assert len(bits) == len(t.splits["test"])
            assert bits.count("1") / len(bits) == pytest.approx(r["per_task"][t.name])


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _no_bar(description: str, total: int) -> _NoBar:
    return _NoBar()


@pytest.mark.parametrize("bad", [{"x": 1}, {"rows": "no"}])
def test_schema_rejects_malformed_results(quick_results, bad):
    from brickwork.bench.report import ResultsSchemaError, validate

    results, _ = quick_results
    with pytest.raises(ResultsSchemaError):
        validate({**results, **bad})
    row = dict(results["rows"][0], per_task={"nope": 2.0})
    with pytest.raises(ResultsSchemaError, match="per_task"):
        validate({**results, "rows": [row]})
