"""Scoring functions that Ray workers import in the search tests (PYTHONPATH: this folder)."""

from __future__ import annotations

import os
from pathlib import Path


def score(model):
    """Higher when every tensor's mean is near 0.05 (a smooth function of the weights)."""
    return -sum((float(v.float().mean()) - 0.05) ** 2 for v in model.values())


def slow(model):
    """:func:`score`, 0.2 s later (a search slow enough to be killed in the middle)."""
    import time

    time.sleep(0.2)
    return score(model)


def die_once(model):
    """Kills its worker process on the first call after the marker is removed (a crash the
    search must survive), then scores like :func:`score`."""
    marker = Path(os.environ["BRICKWORK_TEST_MARKER"])
    if not marker.exists():
        marker.write_text("died")
        os._exit(1)
    return score(model)


def not_a_number(model):
    return "high"


def module_kind(model):
    """1.0 when the merged model arrives as a transformers module, else 0.0."""
    import torch

    return float(isinstance(model, torch.nn.Module) and hasattr(model, "config"))


def hungry(model):
    """Asks for 8 GB (more than the test's ray.memory_per_worker), then scores."""
    import torch

    torch.empty(8 * 2**30, dtype=torch.uint8)
    return score(model)
