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
