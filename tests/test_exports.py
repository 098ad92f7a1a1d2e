"""Every lazily exported name resolves, and importing brickwork does not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import brickwork
import brickwork.route


@pytest.mark.parametrize("module", [brickwork, brickwork.route], ids=lambda m: m.__name__)
def test_every_export_resolves(module):
    names = [n for n in module.__all__ if n != "__version__"]
    missing = [n for n in names if getattr(module, n, None) is None]
    assert not missing
    with pytest.raises(AttributeError, match="no attribute"):
        module.not_a_real_name  # noqa: B018


def test_import_brickwork_is_light():
    code = "import brickwork, brickwork.route, brickwork.cli, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
