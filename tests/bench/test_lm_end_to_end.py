"""``brickwork bench --suite lm --quick`` end to end: the outputs, the schema, the references,
the cache, and that the saved models and recipes reproduce the rows."""

from __future__ import annotations

import json

import pytest
import torch

from brickwork.bench import lm as LM
from brickwork.bench import lm_data as LD
from brickwork.bench.lm_report import SCHEMA_VERSION, validate
from brickwork.merge.registry import get_method, list_methods

_READABLE = [d for d in LD.DOMAINS.values() if d.missing() is None]
pytestmark = pytest.mark.skipif(
    len(_READABLE) < 2,
    reason="the LM suite needs two of dict-gcide, dict-foldoc, fortunes, fortunes-de",
)


@pytest.fixture(scope="module")
def lm_run(bench_cache, tmp_path_factory):
    """One quick run, recording every evaluation's split: (results, out, evaluator calls)."""
    calls: list[tuple[str, tuple[str, ...]]] = []

    class Recording(LM.Evaluator):
        def losses(self, model, split, domains=None):
            out = super().losses(model, split, domains)
            calls.append((split, tuple(out)))
            return out

    mp = pytest.MonkeyPatch()
    mp.setattr(LM, "Evaluator", Recording)
    out = tmp_path_factory.mktemp("lm-out") / "lm"
    try:
        results = LM.run_lm_bench(out=out, quick=True, seed=0, progress=False)
    finally:
        mp.undo()
    return results, out, calls


def test_outputs_and_schema(lm_run):
    results, out, _ = lm_run
    on_disk = json.loads((out / "results.json").read_text())
    validate(on_disk)
    assert on_disk["schema"] == SCHEMA_VERSION and on_disk["metric"] == "perplexity"
    assert (out / "results.md").read_text().startswith("# brickwork bench — suite `lm`")
    for png in ("normalized.png", "active_params.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [t["name"] for t in on_disk["tasks"]] == [d.name for d in _READABLE]
    for t in on_disk["tasks"]:
        assert t["n_test"] > 0 and t["n_val"] > 0 and all(t["packages"].values())


def test_rows_references_and_fields(lm_run):
    results, _, _ = lm_run
    rows = {r["method"]: r for r in results["rows"]}
    methods = [r["method"] for r in results["rows"]]
    assert methods[:2] == ["base", "individual"]
    merges = sorted(m for m in methods if rows[m]["kind"] == "merge")
    assert merges == list_methods(data_aware=True)  # data-free and data-aware rows
    assert [m for m in methods if rows[m]["kind"] == "moe"] == [f"moe_{r}" for r in LM.MOE_ROUTERS]
    assert rows["individual"]["normalized"] == 1.0 and rows["base"]["normalized"] == 0.0
    assert rows["individual"]["normalized_ci"] == [1.0, 1.0]
    for r in results["rows"]:
        assert r["status"] == "ok" or r["reason"]
        if r["status"] != "ok":
            continue
        lo, hi = r["normalized_ci"]
        assert lo <= r["normalized"] <= hi
        assert r["avg_ci"][0] <= r["avg"] <= r["avg_ci"][1]
        assert all(v > 1 for v in r["per_task"].values())
        if r["kind"] != "reference" and r["method"] != "linear":
            assert r["vs_linear"] in ("better", "worse", "tie")
    assert rows["moe_task"]["status"] == "ok" and rows["linear"]["status"] == "ok"


def test_data_aware_rows_record_statistics_and_write_their_calibration(lm_run):
    results, out, _ = lm_run
    rows = {r["method"]: r for r in results["rows"]}
    for name in ("regmean", "fisher", "regmean_plusplus", "adamerging"):
        r = rows[name]
        assert r["status"] == "ok", (name, r["reason"])
        st = r["statistics"]
        assert st["split"] == ("val" if name == "adamerging" else "train")
        assert st["examples_per_model"] > 0 and st["seconds"] >= 0
    assert rows["linear"]["statistics"] is None
    # the recipe of a statistics row names calibration files that exist, so
    # `brickwork merge recipes/regmean.yaml OUT` repeats the row
    from safetensors.torch import load_file

    for e in rows["regmean"]["recipe"]["models"]:
        ids = load_file(str(out / "recipes" / e["data"]["path"]))["input_ids"]
        assert ids.shape[0] == e["data"]["n_examples"] and ids.dtype == torch.int64


def test_test_split_is_read_once_per_row_after_selection(lm_run):
    results, _, calls = lm_run
    ok = [r for r in results["rows"] if r["status"] == "ok" and r["kind"] != "reference"]
    n_domains = len(results["tasks"])
    tests = [c for c in calls if c[0] == "test"]
    # base, each fine-tune, each row once; a compression row once per domain (each domain
    # scored by its own compressed fine-tune, like the fine-tunes)
    n_compress = sum(r["kind"] == "compress" for r in ok)
    assert len(tests) == 1 + n_domains + len(ok) + (n_domains - 1) * n_compress
    # every selection call came before its row's test read: the last call is a test read
    # and no two test reads of merge rows follow each other without validation between
    after_refs = calls[2 + 2 * n_domains :]
    assert after_refs[0][0] == "val" and after_refs[-1][0] == "test"


def test_second_run_reuses_the_cache(lm_run, tmp_path):
    results, _, _ = lm_run
    again = LM.run_lm_bench(out=tmp_path, quick=True, seed=0, progress=False,
                            methods=["linear", "ties", "moe_random"])  # fmt: skip
    assert all(again["cache"]["hits"].values())
    assert set(again["cache"]["reused_rows"]) == {"base", "individual", "linear", "ties",
                                                  "moe_random"}  # fmt: skip
    first = {r["method"]: r for r in results["rows"]}
    for r in again["rows"]:
        assert r["per_task"] == first[r["method"]]["per_task"]
        assert r["normalized"] == first[r["method"]]["normalized"]


def test_saved_fine_tune_loads_and_a_recipe_reproduces_its_row(lm_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import brickwork
    from brickwork.merge.api import merge_state_dicts

    results, out, _ = lm_run
    domains = [t["name"] for t in results["tasks"]]
    ft = AutoModelForCausalLM.from_pretrained(str(out / "models" / domains[0]))
    tok = AutoTokenizer.from_pretrained(str(out / "models" / domains[0]))
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    assert ft(input_ids=ids).logits.shape[-1] == len(tok)

    row = next(r for r in results["rows"] if r["method"] == "ties")
    made = brickwork.merge(out / "recipes" / "ties.yaml", tmp_path / "ties", progress=False)
    merged = load_file(str(made / "model.safetensors"))
    states = [load_file(str(out / "models" / d / "model.safetensors")) for d in domains]
    base = load_file(str(out / "models" / "base" / "model.safetensors"))
    expected = merge_state_dicts("ties", states, base=base, parameters=row["hyperparameters"])
    assert merged.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=0)
    # the rebuilt model scores the row's perplexity on the same test sequences
    texts, _ = LD.load_domains(domains, 0)
    cfg = LM.LT.QUICK
    test = {d: torch.tensor(LD.sequences(tok, texts[d].buckets["test"], cfg.seq_len,
                                         cfg.test_seqs)) for d in domains}  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(made))
    losses = LM.Evaluator({"test": test}).losses(model, "test")
    for d in domains:
        assert float(torch.tensor(losses[d]).mean().exp()) == pytest.approx(
            row["per_task"][d], abs=1e-3
        )


def test_moe_recipe_is_an_upcycle_recipe_of_the_saved_models(lm_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from brickwork.route.recipe import load_upcycle_recipe, upcycle_from_recipe

    results, out, _ = lm_run
    path = out / "recipes" / "moe_random.yaml"
    r = load_upcycle_recipe(path)
    assert r.router_init == "random" and r.format == "mixtral"
    made = upcycle_from_recipe(path, tmp_path / "moe")
    moe = AutoModelForCausalLM.from_pretrained(str(made))
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.config.num_local_experts == len(results["tasks"])


def test_every_merge_recipe_names_its_method_and_models(lm_run):
    import yaml

    results, out, _ = lm_run
    for r in results["rows"]:
        if r["kind"] == "merge" and r["status"] == "ok":
            rec = yaml.safe_load((out / "recipes" / f"{r['method']}.yaml").read_text())
            assert rec["method"] == r["method"]
            assert ("base" in rec) == (get_method(r["method"]).base != "none")
            assert [m["model"] for m in rec["models"]] == [
                f"../models/{t['name']}" for t in results["tasks"]
            ]


def test_rows_computed_in_two_processes_equal_the_in_process_ones(lm_run, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    import os
    import shutil

    results, _, _ = lm_run
    cache = tmp_path / "cache"
    shutil.copytree(os.environ["BRICKWORK_CACHE"], cache)
    for p in (cache / "bench" / "rows").glob("*.json"):
        if '"method": "individual"' not in p.read_text():
            p.unlink()  # every row but the references (base, individual): workers recompute
    monkeypatch.setenv("BRICKWORK_CACHE", str(cache))
    names = ["linear", "ties", "regmean", "moe_random"]
    again = LM.run_lm_bench(out=tmp_path / "out", quick=True, seed=0, progress=False,
                            methods=names, jobs=2)  # fmt: skip
    first = {r["method"]: r for r in results["rows"]}
    for r in again["rows"]:
        assert r["per_task"] == first[r["method"]]["per_task"], r["method"]
        assert r["normalized_ci"] == first[r["method"]]["normalized_ci"], r["method"]
    assert set(again["cache"]["reused_rows"]) == {"base", "individual"}  # the rest: workers
