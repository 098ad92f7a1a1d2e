"""The bench's terminal table fits the terminal: each row on one line, columns by priority,
hyperparameters below it or a pointer to results.md (which keeps every column)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from brickwork.bench import report

TEXT_TASKS = ["noun_supersense", "gloss_pos", "word_pos", "fortune_topic"]
EIGHT_TASKS = [*TEXT_TASKS, "verb_supersense", "digit", "rot90", "inverted"]
MERGES = {
    "ties": {"lambda": 1.0, "density": 0.2}, "breadcrumbs": {"lambda": 0.5, "density": 0.7},
    "breadcrumbs_ties": {"lambda": 0.5, "density": 0.7}, "dare_linear": {"lambda": 0.7, "density": 0.5},
    "della": {"lambda": 1.0, "density": 0.7}, "task_arithmetic": {"lambda": 0.5},
    "della_linear": {"lambda": 0.5, "density": 0.3}, "dare_ties": {"lambda": 1.0, "density": 0.3},
    "linear": {}, "karcher": {}, "model_stock": {},
}  # fmt: skip
MOE = {  # the bench's MoE rows record long hyperparameter dicts
    "moe_train": {"router": "train", "calibration_per_task": 64, "train_route_by": "token",
                  "top_k": 2, "route_by": "token", "steps": 200, "lr": 0.003, "train_top_k": 2,
                  "aux_coef": 0.01, "examples_per_task": 256, "distil_loss": [0.0095, 0.0066]},
    "moe_task": {"top_k": 2, "route_by": "token", "router": "task", "calibration_per_task": 64},
    "moefy_top4of8": {"n_experts": 8, "top_k": 4, "active_neurons": 0.5,
                      "calibration_per_task": 32, "router_steps": 40},
    "moefy_top2of8": {"n_experts": 8, "top_k": 2, "active_neurons": 0.25,
                      "calibration_per_task": 32, "router_steps": 40},
}  # fmt: skip
SKIPPED = {
    "slerp": "tensor 'encoder.layer.3.attention.self.query.weight': slerp interpolates exactly "
    "two models (the base and one other); got the base and 4 others. Use karcher for more.",
    "passthrough": "tensor 'encoder.layer.3.attention.self.query.weight': passthrough copies "
    "one model's tensor; got 4 models for this tensor.",
}


def _results(tasks: list[str]) -> dict[str, Any]:
    """A schema-valid results dict shaped like a real text-suite run: 4 references, 11
    merges, 2 skipped merges, 4 MoE rows."""

    def row(method: str, kind: str, i: int, hp: dict[str, Any], *, active: int,
            latency: float) -> dict[str, Any]:  # fmt: skip
        per = {t: round(0.5 + 0.4 * ((i * 7 + j * 3) % 10) / 10, 4) for j, t in enumerate(tasks)}
        per[tasks[0]] = 1.0 if i == 1 else per[tasks[0]]  # a 100.0 cell: the widest
        avg = sum(per.values()) / len(per)
        norm = min(avg / 0.8, 1.0)
        return {
            "method": method, "kind": kind, "status": "ok", "reason": None, "per_task": per,
            "correct": {t: "1" * round(200 * a) + "0" * (200 - round(200 * a))
                        for t, a in per.items()},
            "avg": avg, "avg_ci": [avg - 0.031, avg + 0.029], "normalized": norm,
            "normalized_ci": [norm - 0.04, norm + 0.038],
            "vs_linear": None if kind == "reference" or method == "linear" else "tie",
            "normalized_per_task": {t: v / 0.8 for t, v in per.items()},
            "params": 5_300_000 * (4 if kind == "moe" else 1) + 17_300_000,
            "active_params": active, "latency_ms": latency, "seconds": 12.5 + i,
            "train_seconds": None, "hyperparameters": hp, "validation": None, "statistics": None,
        }  # fmt: skip

    rows = [row(m, "reference", i, {}, active=22_600_000, latency=3.4)
            for i, m in enumerate(["base", "individual", "multitask", "ensemble"])]  # fmt: skip
    rows += [row(m, "merge", 4 + i, hp, active=22_600_000, latency=3.52)
             for i, (m, hp) in enumerate(MERGES.items())]  # fmt: skip
    rows += [
        {"method": m, "kind": "merge", "status": "skipped", "reason": why, "per_task": {},
         "correct": {}, "avg": None, "avg_ci": None, "normalized": None, "normalized_ci": None,
         "vs_linear": None, "normalized_per_task": {}, "params": None,
         "active_params": None, "latency_ms": None, "seconds": 0.0, "train_seconds": None,
         "hyperparameters": {}, "validation": None, "statistics": None}
        for m, why in SKIPPED.items()
    ]  # fmt: skip
    rows += [row(m, "moe", 20 + i, hp, active=26_100_000 - i * 3_000_000, latency=5.9 - i)
             for i, (m, hp) in enumerate(MOE.items())]  # fmt: skip
    results = {
        "schema": report.SCHEMA_VERSION, "suite": "text", "seed": 0, "train_seed": 0, "quick": False,
        "created": "2026-11-24T12:00:00+00:00",
        "tasks": [{"name": t, "description": f"task {t}", "classes": ["a", "b"],
                   "n_train": 700, "n_val": 100, "n_test": 200, "source": "wordnet-base",
                   "source_version": "1:3.0-39"} for t in tasks],
        "skipped_tasks": {}, "train_config": {}, "cache": {"hits": {}}, "rows": rows,
        "seeds": None,
        "environment": {"python": "3.11", "platform": "linux", "machine": "x86_64",
                        "processor": "cpu", "cpu_count": 2, "torch_threads": 1,
                        "packages": {"torch": "2.5"}},
        "wall_seconds": 477.0,
    }  # fmt: skip
    report.validate(results)
    return results


def _render(results: dict[str, Any], width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), record=True)
    report.print_table(results, console, out=Path("bench-results/text-x"))
    return console.export_text().splitlines()


def _table_lines(lines: list[str]) -> tuple[str, list[str]]:
    """The header line and the rows (the lines between the rule and the first note)."""
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    body = []
    for line in lines[rule + 1 :]:
        if not line or line[0] == " " or ":" in line:
            break
        body.append(line)
    return lines[rule - 1], body


@pytest.mark.parametrize("tasks", [TEXT_TASKS, EIGHT_TASKS], ids=["4 tasks", "8 tasks"])
def test_table_fits_80_columns_with_each_row_on_one_line(tasks):
    results = _results(tasks)
    lines = _render(results, 80)
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    head, body = _table_lines(lines)
    assert head.split()[:1] == ["method"] and "norm." in head and "avg" in head
    assert [line.split()[0] for line in body] == [r["method"] for r in results["rows"]]
    for r, line in zip(results["rows"], body):
        if r["status"] == "ok":  # the row's values are on its one line
            lo, hi = r["normalized_ci"]
            assert f"{100 * r['normalized']:.1f}±{50 * (hi - lo):.1f}" in line
            assert f"{100 * r['avg']:.1f}" in line
            mark = {"tie": "=", "better": "+", "worse": "−", None: " "}[r["vs_linear"]]
            at = head.index("vs lin") + len("vs lin") - 1  # right-aligned under its header
            assert line.ljust(at + 1)[at] == mark
        else:
            assert set(line.split()[1:]) == {"—"}
    text = "\n".join(lines)
    assert "every column and hyperparameter: bench-results/text-x/results.md" in lines
    for m, why in SKIPPED.items():  # reasons below the table, wrapped at word boundaries
        assert f"{m} skipped: {why}" in " ".join(text.split())


def test_hyperparameters_below_the_table_or_named_in_the_pointer():
    results = _results(TEXT_TASKS)
    lines = _render(results, 80)
    text = "\n".join(lines)
    pointer = next(line for line in " ".join(lines).split("not shown at 80 columns: ")[1:])
    for r in results["rows"]:
        if r["status"] != "ok" or not r["hyperparameters"]:
            continue
        hp = ", ".join(f"{k}={v}" for k, v in r["hyperparameters"].items())
        on_a_line = re.search(rf"^  {r['method']} +{re.escape(hp)}$", text, re.M)
        assert on_a_line or r["method"] in pointer, r["method"]
    assert re.search(r"^  ties +lambda=1\.0, density=0\.2$", text, re.M)  # short ones fit
    assert "moe_train" in pointer  # ~200 characters: never on an 80-column line


def _headers(head: str) -> list[str]:
    return re.split(r" {2,}", head.strip())


def test_columns_by_priority_with_a_task_legend():
    lines = _render(_results(TEXT_TASKS), 80)
    head, _ = _table_lines(lines)
    text = " ".join(" ".join(lines).split())
    # the four full names do not fit beside the cost columns: abbreviated, with a legend
    assert _headers(head) == ["method", "nsup", "gpos", "wpos", "ftop", "avg", "norm.",
                              "vs lin", "act. M", "ms"]  # fmt: skip
    assert ("tasks: nsup = noun_supersense, gpos = gloss_pos, wpos = word_pos, "
            "ftop = fortune_topic") in text  # fmt: skip
    assert "not shown at 80 columns: params M; s;" in text
    # eight tasks: the interval and the comparison with linear before the last per-task
    # columns, and those before the cost columns
    lines = _render(_results(EIGHT_TASKS), 80)
    head, _ = _table_lines(lines)
    assert _headers(head) == ["method", "nsup", "gpos", "wpos", "ftop", "vsup", "digit",
                              "avg", "norm.", "vs lin"]  # fmt: skip
    assert "not shown at 80 columns: rot90; inve;" in " ".join(" ".join(lines).split())
    head, _ = _table_lines(_render(_results(EIGHT_TASKS), 60))
    assert _headers(head)[:3] == ["method", "nsup", "gpos"]
    assert _headers(head)[-3:] == ["avg", "norm.", "vs lin"]


def test_wider_terminal_shows_more_columns():
    results = _results(TEXT_TASKS)
    head80, _ = _table_lines(_render(results, 80))
    lines = _render(results, 130)  # 120 keeps one more column with abbreviated names
    assert all(len(line) <= 130 for line in lines)
    head120, body = _table_lines(lines)
    assert len(_headers(head120)) > len(_headers(head80))
    assert _headers(head120)[1:5] == TEXT_TASKS  # full task names at 130, no legend
    assert "s" in _headers(head120) and "s" not in _headers(head80)
    assert not any(line.startswith("tasks:") for line in lines)
    assert len(body) == len(results["rows"])
    lines = _render(results, 400)  # wide enough for every column, hyperparameters too
    head, body = _table_lines(lines)
    assert _headers(head)[-1] == "hyperparameters"
    assert not any("not shown" in line for line in lines)
    assert all(len(line) <= 400 for line in lines)


def test_markdown_keeps_every_column_and_hyperparameter():
    results = _results(EIGHT_TASKS)
    md = report.markdown(results)
    head = next(line for line in md.splitlines() if line.startswith("| method"))
    for c in [*EIGHT_TASKS, "avg", "normalized", "params (M)", "active (M)", "latency (ms)",
              "seconds", "hyperparameters"]:  # fmt: skip
        assert f"| {c} |" in head
    for hp in MOE.values():
        assert ", ".join(f"{k}={v}" for k, v in hp.items()) in md
    assert "| 22.6 | 3.52 |" in md  # three significant digits: a tiny model's 0.0107 ms too
    assert report._sig(0.0107) == "0.0107" and report._sig(6_738_000_000, 1e6) == "6738"


def test_abbreviations_are_short_and_distinct():
    names = report._abbreviations(EIGHT_TASKS)
    assert all(len(a) <= 5 for a in names.values())
    assert len(set(names.values())) == len(EIGHT_TASKS)
    assert names["rot90"] == "rot90" and names["verb_supersense"] == "vsup"
    clash = report._abbreviations(["noun_supersense", "noun_superclass"])
    assert clash == {"noun_supersense": "t1", "noun_superclass": "t2"}


def test_real_quick_bench_table_fits_80_columns(quick_results):
    results, out = quick_results
    console = Console(width=80, file=io.StringIO(), record=True)
    report.print_table(results, console, out=out)
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    _, body = _table_lines(lines)
    assert [line.split()[0] for line in body] == [r["method"] for r in results["rows"]]
