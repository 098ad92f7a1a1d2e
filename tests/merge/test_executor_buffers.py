"""The executor's reused input buffers: outputs are never overwritten by a later job's
inputs, whatever the method returns (a new tensor, or one of its inputs)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from brickwork.checkpoint.reader import open_checkpoint
from brickwork.merge.executor import execute
from brickwork.merge.plan import build_plan
from brickwork.recipe import parse_recipe


def _write(path, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    # many tensors of one size, so that buffers are handed from job to job
    state = {f"layers.{i}.w": torch.randn(8, 16, generator=g).to(dtype) for i in range(6)}
    state["norm.weight"] = torch.randn(16, generator=g).to(dtype)
    save_file(state, str(path))
    return state


class _Keep:
    def __init__(self) -> None:
        self.out: dict[str, torch.Tensor] = {}

    def write(self, name, tensor):
        self.out[name] = tensor  # held, not copied: a recycled buffer would show


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["passthrough", "task_arithmetic", "linear"])
def test_outputs_survive_later_jobs(tmp_path, stored, method):
    states = {k: _write(tmp_path / f"{k}.safetensors", i, stored) for i, k in enumerate("bxy")}
    ckpts = {k: open_checkpoint(tmp_path / f"{k}.safetensors") for k in "bxy"}
    models = [{"model": "x"}] if method == "passthrough" else [{"model": "x"}, {"model": "y"}]
    base = "b" if method == "task_arithmetic" else None
    recipe = parse_recipe({"method": method, "base": base, "models": models, "dtype": "float32"})
    sink = _Keep()
    execute(build_plan(recipe, ckpts), ckpts, sink, progress=False)
    for name in states["x"]:
        x, y, b = (states[k][name].float() for k in "xyb")
        expected = {
            "passthrough": x,
            "task_arithmetic": ((x - b) + (y - b)) + b,
            "linear": (x + y) / 2,
        }
        assert torch.equal(sink.out[name], expected[method]), name
