"""brickwork search end to end on a local Ray cluster: best recipe, resume, a dead worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("cma")

from brickwork.errors import BrickworkError, OutputExistsError, RecipeError  # noqa: E402
from brickwork.search.runner import run_search  # noqa: E402


def make_models(root: Path, n_layers: int = 4) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.weight": torch.randn(6, 6, generator=g) for i in range(n_layers)}
    base["model.embed_tokens.weight"] = torch.randn(5, 6, generator=g)
    for k, name in enumerate(("base", "a", "b", "c")):
        (root / name).mkdir(parents=True)
        noise = {n: 0.05 * torch.randn(v.shape, generator=g) for n, v in base.items()}
        st = {n: v + (0.1 * k + noise[n] if name != "base" else 0) for n, v in base.items()}
        save_file(st, str(root / name / "model.safetensors"))


def config(root: Path, **kw) -> Path:
    cfg = {
        "genome": {"merge_method": "task_arithmetic", "base_model": "base",
                   "models": ["a", "b", "c"], "layer_granularity": 2, "parameters": ["weight"]},
        "evaluator": {"callable": kw.pop("callable", "_scorer:score")},
        "optimizer": {"name": kw.pop("optimizer", "cma"), "seed": 0, "batch": 4},
        "max_evals": kw.pop("max_evals", 12),
        "ray": {"workers": 2},
        **kw,
    }  # fmt: skip
    p = root / "search.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def points(out: Path) -> list[tuple[int, list[float], float]]:
    recs = [json.loads(line) for line in (out / "search.jsonl").read_text().splitlines()]
    return sorted((r["i"], r["x"], r["score"]) for r in recs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_models(root)
    return root


@pytest.fixture(scope="module")
def reference(models):
    """One uninterrupted search (12 candidates, 3 batches of 4) on a cluster it starts and
    shuts down itself."""
    import ray

    assert not ray.is_initialized()
    res = run_search(config(models), models / "ref", progress=False)
    assert not ray.is_initialized()  # the search shut down the cluster it started
    return res


@pytest.fixture(scope="module")
def cluster(reference):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_search_scores_every_candidate_and_best_yml_rebuilds_the_best(models, reference, tmp_path):
    import _scorer
    from safetensors.torch import load_file

    from brickwork.merge.api import merge

    out = models / "ref"
    recs = points(out)
    assert [i for i, _, _ in recs] == list(range(12))
    assert reference.best["score"] == max(s for _, _, s in recs)
    for f in ("best.yml", "report.json", "report.md", "scores.png", "optimizer.json", "config.yml"):
        assert (out / f).is_file(), f
    assert json.loads((out / "optimizer.json").read_text())["told"] == 12
    merged = merge(out / "best.yml", tmp_path / "best", progress=False)
    score = _scorer.score(load_file(str(merged / "model.safetensors")))
    assert score == reference.best["score"]  # the same model, bit for bit
    first = json.loads((out / "search.jsonl").read_text().splitlines()[0])
    assert first["merge_s"] >= 0 and first["eval_s"] >= 0 and first["wall_s"] >= first["eval_s"]
    assert first["worker_peak_rss_mb"] > 50  # a Python process with torch imported
    report = json.loads((out / "report.json").read_text())
    assert report["per_candidate"]["worker_peak_rss_mb"] >= first["worker_peak_rss_mb"]


def test_resume_after_a_stop_reaches_the_same_result(models, reference, cluster):
    out = models / "stopped"
    run_search(config(models), out, max_evals=6, progress=False)  # stops inside batch 2
    assert len(points(out)) == 6
    res = run_search(config(models), out, resume=True, progress=False)
    assert points(out) == points(models / "ref")
    assert res.report["evaluations_this_run"] == 6  # the replayed six are not counted again
    assert res.report["evaluations"] == 12
    assert res.best["i"] == reference.best["i"]
    assert (out / "best.yml").read_text() == (models / "ref" / "best.yml").read_text()


def test_merging_on_disk_scores_the_same_candidates_as_in_memory(models, reference, cluster):
    out = models / "disk"
    res = run_search(config(models, merge_in="disk"), out, max_evals=8, progress=False)
    assert res.report["merge_in"] == "disk" and reference.report["merge_in"] == "memory"
    ref = {i: (x, s) for i, x, s in points(models / "ref")}
    for i, x, s in points(out):
        assert x == ref[i][0] and s == pytest.approx(ref[i][1], abs=1e-6)
    assert not list(Path(tempfile.gettempdir()).glob("brickwork-search-*/merged"))


def test_resume_after_kill_9(models, reference, cluster):
    out = models / "killed"
    cfg = config(models, callable="_scorer:slow")  # the same scores, 0.2 s each: killable
    env = {**os.environ, "PYTHONPATH": os.environ["PYTHONPATH"]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "brickwork.cli", "search", str(cfg), str(out), "-q"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    log = out / "search.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = len(log.read_text().splitlines())
    assert 3 <= n < 12 or proc.returncode == 0  # killed mid-search (or it had finished)
    run_search(cfg, out, resume=True, progress=False)
    assert points(out) == points(models / "ref")


def test_a_dead_worker_is_retried_and_the_search_goes_on(models, reference, cluster, tmp_path,
                                                         monkeypatch):  # fmt: skip
    marker = tmp_path / "died"
    monkeypatch.setenv("BRICKWORK_TEST_MARKER", str(marker))
    # the workers of the running cluster do not see the new variable: start one that does
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = models / "crash"
    res = run_search(config(models, callable="_scorer:die_once"), out, progress=False)
    assert marker.read_text() == "died"  # a worker did die
    assert res.report["failed"] == 0
    assert points(out) == points(models / "ref")  # retried: the same scores


def test_memory_per_worker_bounds_a_worker_and_fails_only_the_candidate(models, cluster, tmp_path):
    ray_opts = {"workers": 2, "memory_per_worker": "3GB"}
    out = tmp_path / "bounded"
    res = run_search(config(models, max_evals=4, ray=ray_opts), out, progress=False)
    assert res.report["failed"] == 0  # within the bound: scored as usual
    assert all(r["worker_vm_data_mb"] > 100 for r in res.records)  # torch alone takes more
    out = tmp_path / "hungry"
    with pytest.raises(BrickworkError, match="no candidate was scored"):
        run_search(config(models, max_evals=4, callable="_scorer:hungry", ray=ray_opts), out,
                   progress=False)  # fmt: skip
    recs = [json.loads(line) for line in (out / "search.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["status"] == "failed" for r in recs)
    assert "needs more than ray.memory_per_worker = 3.00 GB" in recs[0]["error"]


def test_random_and_tpe_searches_run_and_log(models, cluster, tmp_path):
    pytest.importorskip("optuna")
    for name in ("random", "tpe"):
        out = tmp_path / name
        res = run_search(config(models, optimizer=name, max_evals=8), out, progress=False)
        recs = points(out)
        assert len(recs) == 8 and res.best["score"] == max(s for _, _, s in recs)


def test_bad_runs_are_clear_errors(models, cluster, tmp_path):
    with pytest.raises(OutputExistsError, match="--resume"):
        run_search(config(models), models / "ref", progress=False)
    with pytest.raises(RecipeError, match="no search.jsonl"):
        run_search(config(models), tmp_path / "new", resume=True, progress=False)
    with pytest.raises(RecipeError, match="differ"):
        run_search(config(models, seed=5), models / "ref", resume=True, progress=False)
    with pytest.raises(RecipeError, match="cannot import module 'nowhere'"):
        run_search(config(models, callable="nowhere:f"), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()  # nothing scored: nothing left behind
    with pytest.raises(RecipeError, match="not a number"):
        run_search(config(models, callable="_scorer:not_a_number"), tmp_path / "y",
                   progress=False)  # fmt: skip
    with pytest.raises(RecipeError, match="no such file"):
        bad = config(models)
        cfg = yaml.safe_load(bad.read_text())
        cfg["genome"]["models"] = ["a", "missing"]
        bad.write_text(yaml.safe_dump(cfg))
        run_search(bad, tmp_path / "z", progress=False)


def _hf_config(root: Path, llama_family, evaluator: dict, max_evals: int = 4) -> Path:
    cfg = {
        "genome": {"merge_method": "task_arithmetic", "base_model": str(llama_family.base),
                   "models": [str(llama_family.ft1), str(llama_family.ft2)],
                   "parameters": ["weight"]},
        "evaluator": evaluator,
        "optimizer": {"name": "random", "seed": 0, "batch": 2},
        "max_evals": max_evals, "ray": {"workers": 2},
    }  # fmt: skip
    p = root / "hf.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_perplexity_evaluator_scores_minus_the_mean_token_loss(llama_family, cluster, tmp_path):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from brickwork.merge.api import merge
    from brickwork.recipe import DataSpec
    from brickwork.stats.data import load_batches

    text = tmp_path / "val.safetensors"  # input_ids (the fixture's tokenizer is a stub)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (12, 10), generator=g)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(text))
    out = tmp_path / "ppl"
    res = run_search(_hf_config(tmp_path, llama_family, {"perplexity": [str(text)]}), out,
                     progress=False)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(merge(out / "best.yml", tmp_path / "m",
                                                           progress=False))).eval()  # fmt: skip
    batches = load_batches(DataSpec(path=str(text)), model_dir=llama_family.base,
                           vocab_size=None, where="test")  # fmt: skip
    total = count = 0.0
    with torch.no_grad():
        for b in batches:
            ids, mask = b["input_ids"], b["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:],
                                                    reduction="none")  # fmt: skip
            m = mask[:, 1:].bool()
            total += float(nll[m].sum())
            count += int(m.sum())
    assert res.best["score"] == pytest.approx(-total / count, rel=1e-5)


def test_callable_gets_a_transformers_module_for_hf_directories(llama_family, cluster, tmp_path):
    res = run_search(_hf_config(tmp_path, llama_family, {"callable": "_scorer:module_kind"}),
                     tmp_path / "kind", progress=False)  # fmt: skip
    assert [r["score"] for r in res.records] == [1.0] * 4


def test_joins_a_running_cluster_with_ray_address(models, reference, tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port = 26379 + os.getpid() % 1000
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        out = tmp_path / "joined"
        run_search(config(models), out, ray_address=f"127.0.0.1:{port}", progress=False)
        assert points(out) == points(models / "ref")
        assert not ray.is_initialized()  # disconnected from the cluster it joined ...
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # fmt: skip
