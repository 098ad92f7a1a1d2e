"""The LM suite's compression rows on the quick models: one test read per domain and row,
LoRA at full rank reproduces the fine-tunes, the stored counts of pruned and factorised
models, N:M groups, and row selection by name."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from brickwork.bench import lm as LM
from brickwork.bench import lm_compress_rows as LC
from brickwork.bench import lm_data as LD
from brickwork.bench import lm_train as LT
from brickwork.bench.compress_names import COMPRESS_ROWS
from brickwork.bench.lm_rows import calibration

_READABLE = [d for d in LD.DOMAINS.values() if d.missing() is None]
pytestmark = pytest.mark.skipif(
    len(_READABLE) < 2,
    reason="the LM suite needs two of dict-gcide, dict-foldoc, fortunes, fortunes-de",
)


def _bar(*_):
    return contextlib.nullcontext(None)


class _Recording(LM.Evaluator):
    def __init__(self, splits):
        super().__init__(splits)
        self.log = []

    def losses(self, model, split, domains=None):
        out = super().losses(model, split, domains)
        self.log.append((split, tuple(out)))
        return out


@pytest.fixture(scope="module")
def quick(bench_cache):
    """(models, recording evaluator, row_key) of the quick LM suite (trained once, cached)."""
    cfg = LT.QUICK
    texts, _ = LD.load_domains([d.name for d in _READABLE[:2]], 0)
    models = LT.Models(cfg, texts, 0)
    models.prepare(jobs=1, bar=_bar)
    splits, _, row_key = LM._context_parts(models, texts, cfg, 0)
    return models, _Recording(splits), row_key


def _rows(quick, names, monkeypatch):
    models, ev, row_key = quick
    monkeypatch.setattr(LC, "load_row", lambda key: None)  # computed here, not from the cache
    monkeypatch.setattr(LC, "save_row", lambda key, row: None)
    ev.log.clear()
    return LC.compress_rows(models, ev, names, row_key=row_key, reused=[], bar=_bar)


def test_each_domain_is_read_once_per_row_from_the_test_split(quick, monkeypatch):
    models, ev, _ = quick
    rows = _rows(quick, ["magnitude_50", "wanda_50"], monkeypatch)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    domains = tuple(models.keys)
    assert ev.log == [("test", (d,)) for d in domains] * 2  # no val read: nothing is chosen
    for r in rows:
        assert r["kind"] == "compress" and sorted(r["_losses"]) == sorted(domains)
        assert r["latency_ms"] > 0 and r["hyperparameters"] == COMPRESS_ROWS[r["method"]][1]


def test_lora_at_full_rank_reproduces_the_fine_tunes_and_too_large_a_rank_is_skipped(
    quick, monkeypatch
):
    models, ev, _ = quick
    assert models.cfg.hidden_size == 32  # lora_r32: full rank of every quick module
    full, too_big = _rows(quick, ["lora_r32", "lora_r128"], monkeypatch)
    n_base = sum(v.numel() for v in models.state(models.base_key).values())
    for d, k in models.keys.items():
        ft = ev.losses(models.load(k), "test", [d])[d]
        np.testing.assert_allclose(full["_losses"][d], ft, rtol=0, atol=2e-4)
    assert full["active_params"] == n_base and full["params"] > n_base
    assert too_big["status"] == "skipped" and "rank 128" in too_big["reason"]


def test_pruned_params_are_the_non_zeros_and_two_of_four_groups_hold_at_most_two(quick):
    models, _, _ = quick
    calib = calibration(models, 16)
    d = next(iter(models.keys))
    dense = models.state(models.keys[d])
    for name in ("wanda_2of4", "sparsegpt_50"):
        model, stored, active = LC._prune(models, d, COMPRESS_ROWS[name][1], calib[d])
        state = model.state_dict()
        pruned = [k for k in state if ".layers." in k and k.endswith("proj.weight")]
        assert len(pruned) == 7 * models.cfg.num_layers
        zeros = sum(int((state[k] == 0).sum()) for k in pruned)
        assert stored == active == sum(v.numel() for v in state.values()) - zeros
        assert zeros == pytest.approx(0.5 * sum(state[k].numel() for k in pruned), abs=1)
        for k in state:  # everything outside the layers' linear weights is the fine-tune's
            if k not in pruned:
                torch.testing.assert_close(state[k], dense[k], rtol=0, atol=0)
        if name == "wanda_2of4":
            for k in pruned:
                w = state[k]  # (out, in): groups of 4 consecutive inputs
                nz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
                assert int(nz.max()) <= 2, k


def test_svd_llm_20_stores_at_most_80_percent_of_the_linear_parameters(quick):
    from brickwork.compress import LowRankLinear

    models, ev, _ = quick
    calib = calibration(models, 16)
    d = next(iter(models.keys))
    dense = models.load(models.keys[d])
    model, stored, _ = LC._lowrank(models, d, COMPRESS_ROWS["svd_llm_20"][1], calib[d])
    low = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(low) == 7 * models.cfg.num_layers
    before = sum(dense.get_submodule(n).weight.numel() for n in low)
    after = sum(p.numel() for m in low.values() for p in m.parameters())
    assert after <= 0.8 * before
    assert stored == sum(p.numel() for p in dense.parameters()) - before + after
    loss = ev.losses(model, "test", [d])[d].mean()
    base = ev.losses(models.load(models.base_key), "test", [d])[d].mean()
    assert loss < base + 1.0  # a working model, not noise


def test_compression_names_are_not_merge_methods():
    assert LM.split_names(["ties", "wanda_50", "moe_task"], moe=True) == (["ties"], ["task"])
    assert LM.split_names(["svd_llm_20"], moe=True) == ([], [])
