"""``brickwork compress ...``: LoRA extraction, pruning, low-rank factorisation.

Only typer is imported at module level. Each command lives in its own ``cli_<name>.py``
with a ``register(app)`` function, so the parts can grow apart."""

from __future__ import annotations

import typer

from . import cli_adapters, cli_lora, cli_lowrank, cli_prune

compress_app = typer.Typer(
    help="Make one model smaller: extract LoRA adapters, prune, factorise into low rank.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

for _part in (cli_lora, cli_prune, cli_lowrank, cli_adapters):
    _part.register(compress_app)
