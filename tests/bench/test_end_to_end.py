from __future__ import annotations

import json

from brickwork.bench.report import SCHEMA_VERSION, validate
from brickwork.merge.registry import list_methods


def test_quick_run_writes_every_output_and_matches_the_schema(quick_text_results):
    results, out = quick_text_results
    on_disk = json.loads((out / "results.json").read_text())
    validate(on_disk)
    assert on_disk["schema"] == SCHEMA_VERSION and on_disk["suite"] == "text"
    assert (out / "results.md").read_text().startswith("# brickwork bench")
    assert (out / "normalized.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert on_disk["environment"]["packages"]["torch"]


def test_every_registered_method_has_a_row(quick_text_results):
    results, _ = quick_text_results
    methods = [r["method"] for r in results["rows"]]
    assert methods[:4] == ["base", "individual", "multitask", "ensemble"]
    assert sorted(methods[4:]) == list_methods()
    for r in results["rows"]:
        assert r["status"] == "ok" or r["reason"]  # a skipped row says why
    ind = next(r for r in results["rows"] if r["method"] == "individual")
    assert ind["normalized"] == 1.0


def test_second_run_reuses_cached_fine_tunes(quick_text_results, tmp_path):
    from brickwork.bench import run_bench

    results, _ = quick_text_results
    again = run_bench("text", out=tmp_path, quick=True, methods=["linear"], progress=False)
    assert all(again["cache"]["hits"].values())
    first = {r["method"]: r["per_task"] for r in results["rows"]}
    for r in again["rows"]:
        assert r["per_task"] == first[r["method"]]  # deterministic given the cache
