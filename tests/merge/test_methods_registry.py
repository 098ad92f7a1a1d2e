"""Tests generated from the merge-method registry (STYLE.md §5).

Every registered method gets these without writing anything: merging copies of one
model gives that model back, seeded methods are reproducible, output shapes and
dtypes follow the inputs. A method that needs special inputs declares it in the
small tables below, not in a new test.
"""

from __future__ import annotations

import pytest
import torch

from brickwork.merge.api import merge_state_dicts
from brickwork.merge.registry import get_method, list_methods

METHODS = list_methods()

# Methods that combine exactly one non-base model with the base (or copy one model).
ONE_MODEL = {"slerp", "passthrough", "nearswap", "arcee_fusion"}
# Methods that take exactly two non-base models.
TWO_MODELS = {"nuslerp"}
# Parameters that make a seeded method actually draw random numbers (defaults may not).
RANDOMISING = {"density": 0.5}
# Values of parameters that have no default (as in mergekit).
REQUIRED = {"nearswap": {"t": 0.5}}


def _n_models(name: str) -> int:
    return 1 if name in ONE_MODEL else 2 if name in TWO_MODELS else 3


def _state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g).to(dtype),
        "layers.0.attn.weight": torch.randn(8, 8, generator=g).to(dtype),
        "layers.0.attn.bias": torch.randn(8, generator=g).to(dtype),
        "layers.1.attn.weight": torch.randn(8, 8, generator=g).to(dtype),
        "layers.1.attn.bias": torch.randn(8, generator=g).to(dtype),
        "norm.weight": torch.randn(8, generator=g).to(dtype),
        "position_ids": torch.arange(12, dtype=torch.int64),  # integer buffer: copied
    }


def _merge(name: str, models, base, **kw):
    m = get_method(name)
    kw["parameters"] = {**REQUIRED.get(name, {}), **kw.get("parameters", {})}
    return merge_state_dicts(name, models, base=base if m.base != "none" else None, **kw)


def test_registry_lists_the_issue_methods():
    expected = {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "slerp",
        "karcher",
        "model_stock",
        "passthrough",
    }
    assert expected <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_copies_give_the_model_back(name):
    model = _state(0)
    copies = [{k: v.clone() for k, v in model.items()} for _ in range(_n_models(name))]
    merged = _merge(name, copies, base={k: v.clone() for k, v in model.items()}, seed=3)
    assert list(merged) == list(model)
    for k, v in model.items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-6, msg=f"{name}: {k}")


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).seeded])
def test_seeded_methods_are_reproducible(name):
    base = _state(0)
    g = torch.Generator().manual_seed(9)
    models = [
        {
            k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for _ in range(_n_models(name))
    ]
    params = {
        k: v for k, v in RANDOMISING.items() if k in {p.name for p in get_method(name).params}
    }
    a = _merge(name, models, base, parameters=params, seed=1)
    b = _merge(name, models, base, parameters=params, seed=1)
    c = _merge(name, models, base, parameters=params, seed=2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a), f"{name}: seed changes nothing"


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).seeded])
def test_seeds_are_per_tensor_not_per_position(name):
    """Two identical tensors under different names draw different random masks."""
    base = {"a.weight": torch.zeros(32, 32), "b.weight": torch.zeros(32, 32)}
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(32, 32, generator=g)
    models = [{k: v + delta for k, v in base.items()} for _ in range(_n_models(name))]
    params = {
        k: v for k, v in RANDOMISING.items() if k in {p.name for p in get_method(name).params}
    }
    out = _merge(name, models, base, parameters=params, seed=0)
    assert not torch.equal(out["a.weight"], out["b.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", METHODS)
def test_output_shape_and_dtype_follow_the_input(name, dtype):
    base = _state(0, dtype)
    models = [
        {
            k: (v.float() + 0.05 * (i + 1)).to(dtype) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for i in range(_n_models(name))
    ]
    merged = _merge(name, models, base, seed=0)
    assert set(merged) == set(base)
    for k, v in base.items():
        assert merged[k].shape == v.shape, k
        assert merged[k].dtype == v.dtype, k
        assert torch.isfinite(merged[k].float()).all(), k
    torch.testing.assert_close(merged["position_ids"], base["position_ids"], atol=0, rtol=0)


@pytest.mark.parametrize("name", METHODS)
def test_output_dtype_option(name):
    base = _state(0)
    models = [{k: v.clone() for k, v in base.items()} for _ in range(_n_models(name))]
    merged = _merge(name, models, base, dtype="bfloat16")
    assert merged["layers.0.attn.weight"].dtype == torch.bfloat16
    assert merged["position_ids"].dtype == torch.int64  # integer buffers keep their dtype


@pytest.mark.parametrize("name", METHODS)
def test_inputs_are_not_modified_and_outputs_are_new(name):
    base = _state(0)
    models = [
        {k: v + 0.1 * (i + 1) if v.is_floating_point() else v.clone() for k, v in base.items()}
        for i in range(_n_models(name))
    ]
    before = [{k: v.clone() for k, v in m.items()} for m in [base, *models]]
    merged = _merge(name, models, base, seed=0)
    for m, b in zip([base, *models], before):
        for k in m:
            assert torch.equal(m[k], b[k]), f"{name} modified input tensor {k}"
    inputs = {t.untyped_storage().data_ptr() for m in [base, *models] for t in m.values()}
    for k, v in merged.items():
        assert v.untyped_storage().data_ptr() not in inputs, (
            f"{name}: output '{k}' aliases an input"
        )
        v.add_(1)  # a user may edit the result in place (no inference tensors)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_is_documented(name):
    m = get_method(name)
    assert m.description, name
    assert m.reference, name
    for p in m.params:
        assert p.name and not p.name.endswith("_")
