"""What data-aware merges hold in memory: the statistics step frees each float64 Gram
accumulator once it is converted to float32, and a merge whose statistics are cached does not
load the models."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import brickwork.stats as stats
from brickwork.stats import statistics_for
from brickwork.stats.collect import collect_gram


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRICKWORK_CACHE", str(tmp_path / "cache"))


def test_gram_accumulators_are_freed_before_the_file_is_written(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    batches = [torch.randn(3, 6) for _ in range(4)]  # (batch, in)
    expected = {n: g.sum.float() for n, g in collect_gram(model, batches).items()}
    accumulators: list[weakref.ref] = []
    alive_at_save: list[int] = []

    def tracking(*args, **kwargs):
        grams = collect_gram(*args, **kwargs)
        accumulators.extend(weakref.ref(g.sum) for g in grams.values())
        return grams

    real_save = stats.save_atomic

    def save(path, tensors, info):
        gc.collect()
        alive_at_save.append(sum(r() is not None for r in accumulators))
        real_save(path, tensors, info)

    monkeypatch.setattr("brickwork.stats.collect.collect_gram", tracking)
    monkeypatch.setattr(stats, "save_atomic", save)
    f = statistics_for(model, batches, "gram")
    assert len(accumulators) == 2 and alive_at_save == [0]
    for name, g in expected.items():
        got = f.get(name)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, g, rtol=0, atol=0)
