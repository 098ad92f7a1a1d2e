"""device=: per-tensor compute on cpu / cuda / auto, with streaming unchanged.

The CUDA tests run only where torch sees a GPU (marker ``gpu``); everywhere else the cpu
path is checked against the default and ``cuda`` must be refused with a clear message.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import write_yaml

from brickwork.errors import BrickworkError
from brickwork.merge.api import merge_state_dicts
from brickwork.merge.registry import get_method, list_methods

METHODS = list_methods()
ONE_MODEL = {"slerp", "passthrough"}
NO_CUDA = not torch.cuda.is_available()


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g),
        "layers.0.weight": torch.randn(8, 8, generator=g),
        "layers.0.bias": torch.randn(8, generator=g),
        "position_ids": torch.arange(12),
    }


def _merge(name: str, **kw) -> dict[str, torch.Tensor]:
    base = _state(0)
    m = get_method(name)
    n = 1 if name in ONE_MODEL else min(3, m.n_models[1] or 3)
    g = torch.Generator().manual_seed(5)
    models = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
         for k, v in base.items()}
        for _ in range(n)
    ]  # fmt: skip
    params = {"density": 0.5} if any(p.name == "density" for p in m.params) else {}
    params |= {p.name: 0.5 for p in m.params if p.required}  # nearswap's t
    return merge_state_dicts(
        name, models, base=None if m.base == "none" else base, parameters=params, seed=1, **kw
    )


@pytest.mark.parametrize("name", METHODS)
def test_device_cpu_is_the_default_path(name):
    default = _merge(name)
    on_cpu = _merge(name, device="cpu")
    assert list(on_cpu) == list(default)
    for k in default:
        assert on_cpu[k].device.type == "cpu"
        assert torch.equal(on_cpu[k], default[k]), f"{name}: {k}"


@pytest.mark.skipif(not NO_CUDA, reason="auto picks the GPU here")
def test_auto_without_a_gpu_is_cpu():
    a, b = _merge("ties", device="auto"), _merge("ties")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not NO_CUDA, reason="a GPU is available")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(BrickworkError, match=r"--device.*no CUDA GPU.*--device cpu"):
        _merge("linear", device="cuda")


def test_unknown_device_is_refused():
    with pytest.raises(BrickworkError, match="use cpu, cuda, cuda:N or auto"):
        _merge("linear", device="tpu")


@pytest.mark.skipif(not NO_CUDA, reason="a GPU is available")
def test_cli_device_cuda_without_a_gpu_exits_2(run_cli, tmp_path, llama_family):
    recipe = write_yaml(
        tmp_path / "r.yaml",
        {"method": "linear", "models": [{"model": str(llama_family.ft1)}]},
    )
    out = tmp_path / "out"
    code, _, err = run_cli("merge", recipe, out, "-q", "--device", "cuda")
    assert code == 2
    assert "--device" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", METHODS)
def test_cuda_agrees_with_cpu(name):
    """Same inputs, same seed: the same result up to float rounding (CUDA reductions sum in
    another order), and for seeded methods the same random masks (drawn on the CPU)."""
    cpu, gpu = _merge(name), _merge(name, device="cuda")
    for k in cpu:
        assert gpu[k].device.type == "cpu"
        torch.testing.assert_close(gpu[k], cpu[k], atol=1e-5, rtol=1e-5, msg=f"{name}: {k}")
        if get_method(name).seeded and cpu[k].is_floating_point():
            base = _state(0)[k]
            assert torch.equal(gpu[k] == base, cpu[k] == base)  # the same entries dropped
