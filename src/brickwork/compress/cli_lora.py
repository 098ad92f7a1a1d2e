"""``brickwork compress lora ...``. Only typer is imported at module level."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the ``lora`` command to ``app`` (not there yet)."""
