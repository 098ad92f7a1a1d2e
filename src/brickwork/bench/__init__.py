"""Benchmark suites: real multi-task data, cached fine-tunes of a shared base, and every
registered merge method evaluated on them (``brickwork bench``)."""

from __future__ import annotations

from .data import MissingDataError
from .runner import run_bench

__all__ = ["MissingDataError", "run_bench"]
