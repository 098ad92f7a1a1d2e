from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory: pytest.TempPathFactory):
    """A private fine-tune cache for the whole session (fine-tunes are shared by tests)."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("bench-cache")
    mp.setenv("BRICKWORK_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def quick_results(bench_cache, tmp_path_factory: pytest.TempPathFactory):
    """One ``--quick`` end-to-end run with every method, on the ``digits`` suite (seconds
    on CPU; merging MiniLM with every method takes minutes): (results dict, output dir)."""
    from brickwork.bench import run_bench

    out = tmp_path_factory.mktemp("bench-out") / "digits"
    results = run_bench("digits", out=out, quick=True, seed=0, progress=False)
    return results, out
