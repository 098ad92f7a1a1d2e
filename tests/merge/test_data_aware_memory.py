"""What data-aware merges hold in memory: the statistics step frees each float64 Gram
accumulator once it is converted to float32, a merge whose statistics are cached does not
load the models, and RegMean solves a wide weight (an LM head) in blocks of output columns
with the same result."""

from __future__ import annotations

import gc
import warnings
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


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    """Two tiny random Llama fine-tunes saved as Hugging Face directories, and a safetensors
    file of calibration input_ids (no tokenizer needed)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    dirs = []
    for i in range(2):
        torch.manual_seed(i)
        d = root / f"ft{i}"
        LlamaForCausalLM(cfg).save_pretrained(d)
        dirs.append(d)
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(root / "calib.safetensors"))  # (examples, tokens)
    return dirs, root / "calib.safetensors"


def test_a_merge_with_cached_statistics_loads_no_model(tmp_path, monkeypatch, llama_family):
    import brickwork
    import brickwork.stats.data as data

    dirs, calib = llama_family
    block = {"path": str(calib), "n_examples": 8, "batch_size": 4}
    recipe = {"method": "regmean", "models": [{"model": str(d), "data": block} for d in dirs]}
    loads: list[str] = []
    real = data.load_hf_module

    def counting(path, where):
        loads.append(where)
        return real(path, where)

    monkeypatch.setattr(data, "load_hf_module", counting)
    brickwork.merge(recipe, tmp_path / "first", progress=False)
    assert len(loads) == 2  # statistics computed: each model loaded once
    loads.clear()
    brickwork.merge(recipe, tmp_path / "second", progress=False)
    assert loads == []  # statistics read from the cache: no model loaded
    from safetensors.torch import load_file

    first, second = (
        load_file(str(tmp_path / o / "model.safetensors")) for o in ("first", "second")
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("singular", [False, True])
def test_regmean_in_column_blocks_is_the_closed_form(axis, singular):
    """regmean_merge fills and solves B = Σ G̃_i W_iᵀ a few output columns at a time; any block
    size gives (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ written out plainly, the statistics untouched."""
    from brickwork.merge.methods.regmean import regmean_merge
    from brickwork.stats.store import TensorStatistics

    g = torch.Generator().manual_seed(3)
    n_in, n_out, alpha = 5, 7, 0.8
    weights = [torch.randn(n_out, n_in, generator=g, dtype=torch.float64) for _ in range(3)]
    xs = [
        torch.randn(1 if singular else 9, n_in, generator=g, dtype=torch.float64) for _ in weights
    ]
    grams = [x.T @ x for x in xs]  # (in, in); Σ of rank 3 < 5 when singular
    alpha = 1.0 if singular else alpha
    scaled = [alpha * gm + (1 - alpha) * torch.diag(torch.diag(gm)) for gm in grams]
    a = sum(s / x.shape[0] for s, x in zip(scaled, xs))
    rhs = sum(s / x.shape[0] @ w.T for s, x, w in zip(scaled, xs, weights))  # (in, out)
    layout = [w if axis == 1 else w.T.contiguous() for w in weights]
    stats = [
        TensorStatistics(gram=gm.clone(), rows=x.shape[0], input_axis=axis)
        for gm, x in zip(grams, xs)
    ]
    outs = []
    for block in (1, 3, 7, 4096):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = regmean_merge(layout, stats, alpha=alpha, gram="mean", check=False, block=block)
        outs.append(out)
        assert bool(caught) == singular  # the ridge is warned about once per tensor
    for st, gm in zip(stats, grams):
        assert torch.equal(st.gram, gm)  # scaled in a copy
    if not singular:
        expected = torch.linalg.solve(a, rhs)  # (in, out)
        expected = expected.T if axis == 1 else expected
        torch.testing.assert_close(outs[0], expected, rtol=1e-10, atol=1e-10)
    # singular: a ridge of 1e-10 × the mean diagonal leaves a condition number near 1e10,
    # which magnifies the last-bit differences of the blocked sums
    tol = 1e-3 * float(outs[0].abs().max()) if singular else 1e-12
    for out in outs[1:]:
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, outs[0], rtol=0, atol=tol)
