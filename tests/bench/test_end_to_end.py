from __future__ import annotations

import json

import pytest

from brickwork.bench import data as D
from brickwork.bench.moe_rows import MOE_ROWS
from brickwork.bench.report import SCHEMA_VERSION, validate
from brickwork.merge.registry import list_methods


def test_quick_run_writes_every_output_and_matches_the_schema(quick_results):
    results, out = quick_results
    on_disk = json.loads((out / "results.json").read_text())
    validate(on_disk)
    assert on_disk["schema"] == SCHEMA_VERSION and on_disk["suite"] == "digits"
    assert (out / "results.md").read_text().startswith("# brickwork bench")
    for chart in ("normalized.png", "params.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert on_disk["environment"]["packages"]["torch"]


def test_every_row_has_intervals_and_a_comparison_with_linear(quick_results):
    results, out = quick_results
    assert results["seeds"] is None  # one seed: no seeds block
    for t in results["tasks"]:
        assert t["n_train"] > 0 and t["n_val"] > 0 and t["n_test"] > 0
        assert "source" in t and "source_version" in t
    n_test = {t["name"]: t["n_test"] for t in results["tasks"]}
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    assert {r["kind"] for r in ok} == {"reference", "merge", "moe", "compress"}
    for r in ok:
        for value, (lo, hi) in ((r["avg"], r["avg_ci"]), (r["normalized"], r["normalized_ci"])):
            assert 0 <= lo <= value <= hi, (r["method"], lo, value, hi)
        assert {t: len(b) for t, b in r["correct"].items()} == n_test
        if r["kind"] == "reference" or r["method"] == "linear":
            assert r["vs_linear"] is None
        else:
            assert r["vs_linear"] in ("better", "worse", "tie"), r["method"]
    for r in results["rows"]:
        if r["status"] != "ok":
            assert (r["avg_ci"], r["normalized_ci"], r["vs_linear"]) == (None, None, None)
    ind = next(r for r in ok if r["method"] == "individual")
    assert ind["normalized_ci"] == [1.0, 1.0]
    md = (out / "results.md").read_text()
    assert "normalized 95 % CI" in md and "Against plain averaging (`linear`)" in md


def test_every_registered_method_has_a_row(quick_results):
    results, _ = quick_results
    methods = [r["method"] for r in results["rows"]]
    assert methods[:4] == ["base", "individual", "multitask", "ensemble"]
    from brickwork.bench.compress_names import COMPRESS_ROWS

    n, c = len(MOE_ROWS), len(COMPRESS_ROWS)
    # data-free merge rows, data-aware merge rows, the MoE rows, then the compression rows
    assert sorted(methods[4 : -n - c]) == list_methods(data_aware=True)
    assert methods[-n - c : -c] == list(MOE_ROWS)
    assert methods[-c:] == list(COMPRESS_ROWS)
    for r in results["rows"]:
        assert r["status"] == "ok" or r["reason"]  # a skipped row says why
    ind = next(r for r in results["rows"] if r["method"] == "individual")
    assert ind["normalized"] == 1.0


def test_second_run_reuses_cached_fine_tunes(quick_results, tmp_path):
    from brickwork.bench import run_bench

    results, _ = quick_results
    again = run_bench("digits", out=tmp_path, quick=True, methods=["linear"], progress=False)
    assert all(again["cache"]["hits"].values())
    first = {r["method"]: r for r in results["rows"]}
    for r in again["rows"]:
        assert r["per_task"] == first[r["method"]]["per_task"]  # deterministic given the cache
        # the cached linear row kept its per-example results: the same intervals
        assert r["correct"] == first[r["method"]]["correct"]
        assert r["normalized_ci"] == first[r["method"]]["normalized_ci"]
    # references and the linear row come from the row cache
    assert again["cache"]["reused_rows"] == [
        "base",
        "individual",
        "multitask",
        "ensemble",
        "linear",
    ]


def test_seeds_repeat_the_bench_and_report_mean_and_std(bench_cache, tmp_path):
    from brickwork.bench import run_bench

    res = run_bench("digits", out=tmp_path, quick=True, methods=["linear", "ties"], moe=False,
                    tasks=["digit", "rot90"], seeds=[0, 1], progress=False)  # fmt: skip
    validate(json.loads((tmp_path / "results.json").read_text()))
    validate(json.loads((tmp_path / "seed-1" / "results.json").read_text()))
    assert (res["seed"], res["train_seed"]) == (0, 0) and res["seeds"]["values"] == [0, 1]
    one = json.loads((tmp_path / "seed-1" / "results.json").read_text())
    assert (one["seed"], one["train_seed"]) == (0, 1) and one["seeds"] is None
    assert one["tasks"] == res["tasks"]  # the same splits, other fine-tunes
    assert one["rows"][1]["correct"] != res["rows"][1]["correct"]
    for r, r1 in zip(res["rows"], one["rows"]):
        e = res["seeds"]["rows"][r["method"]]["normalized"]
        assert e["per_seed"] == [r["normalized"], r1["normalized"]]
        assert e["mean"] == pytest.approx((r["normalized"] + r1["normalized"]) / 2, abs=1e-4)
        assert e["std"] == pytest.approx(abs(r["normalized"] - r1["normalized"]) / 2**0.5, abs=1e-4)
    assert "Across training seeds 0, 1" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not D.WORDNET_DIR.exists(), reason="wordnet-base not installed")
def test_quick_text_suite_end_to_end(bench_cache, tmp_path):
    """The default suite end to end (MiniLM), with two methods to keep it short."""
    from brickwork.bench import run_bench

    results = run_bench(
        "text", out=tmp_path, quick=True, methods=["linear", "ties"], progress=False
    )
    validate(json.loads((tmp_path / "results.json").read_text()))
    from brickwork.bench.text_tasks import DEFAULT_TASKS

    expected = [n for n in DEFAULT_TASKS if n not in results["skipped_tasks"]]
    assert [t["name"] for t in results["tasks"]] == expected
    assert [r["method"] for r in results["rows"]][4:] == ["linear", "ties"]


def test_cli_command_runs_a_narrowed_quick_bench(quick_results, tmp_path):
    import typer
    from typer.testing import CliRunner

    from brickwork.bench.cli import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands: 'bench' stays a subcommand
    args = ["bench", "--suite", "digits", "--quick", "--methods", "linear", "--tasks",
            "digit,rot90", "--out", str(tmp_path)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert [t["name"] for t in res["tasks"]] == ["digit", "rot90"]
    assert [r["method"] for r in res["rows"]][4:] == ["linear"]


def test_cli_selects_moe_rows_by_name_and_refuses_unknown_ones(quick_results, tmp_path):
    import typer
    from typer.testing import CliRunner

    from brickwork.bench.cli import register
    from brickwork.errors import UnknownNameError

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    base = ["bench", "--suite", "digits", "--quick", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, [*base, "--methods", "linear,moefy_top2of8"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in res["rows"]][4:] == ["linear", "moefy_top2of8"]
    r = CliRunner().invoke(app, [*base, "--methods", "linear,moefy_top2of8", "--no-moe"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in res["rows"]][4:] == ["linear"]
    r = CliRunner().invoke(app, [*base, "--methods", "moe_tsk"])
    assert isinstance(r.exception, UnknownNameError) and "moe_task" in str(r.exception)


def test_cli_refuses_seeds_that_are_not_integers(tmp_path):
    import typer
    from typer.testing import CliRunner

    from brickwork.bench.cli import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    args = ["bench", "--suite", "digits", "--quick", "--seeds", "0,x", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--seeds" in r.output and "'0,x'" in r.output
    assert not (tmp_path / "results.json").exists()


def test_cli_refuses_seeds_for_the_lm_suite(tmp_path):
    import typer
    from typer.testing import CliRunner

    from brickwork.bench.cli import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    args = ["bench", "--suite", "lm", "--quick", "--seeds", "0,1", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--seeds" in r.output and "lm suite" in r.output
    assert not (tmp_path / "results.json").exists()


def test_rows_computed_in_two_processes_equal_the_in_process_ones(quick_results, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    """--jobs 2 computes the missing rows in worker processes (into the row cache): the
    same rows as one process computes, and they are not reported as reused."""
    import shutil

    from brickwork.bench import run_bench

    results, _ = quick_results
    # a copy of the session cache without its rows: fine-tunes cached, every row missing
    cache = tmp_path / "cache"
    shutil.copytree(bench_root := __import__("os").environ["BRICKWORK_CACHE"], cache)
    shutil.rmtree(cache / "bench" / "rows")
    assert bench_root != str(cache)
    monkeypatch.setenv("BRICKWORK_CACHE", str(cache))
    names = ["linear", "ties", "fisher", "moe_task"]
    again = run_bench("digits", out=tmp_path / "out", quick=True, methods=names, jobs=2,
                      progress=False)  # fmt: skip
    first = {r["method"]: r for r in results["rows"]}
    for r in again["rows"]:
        assert r["correct"] == first[r["method"]]["correct"], r["method"]
        assert r["normalized_ci"] == first[r["method"]]["normalized_ci"], r["method"]
    assert again["cache"]["reused_rows"] == []  # computed in this run (by workers)
    assert len(list((cache / "bench" / "rows").glob("*.json"))) == 4 + len(names)
