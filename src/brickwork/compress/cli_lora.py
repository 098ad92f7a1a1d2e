"""``brickwork compress lora ...``. Only typer is imported at module level."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``lora`` command to ``app``."""

    @app.command("lora")
    def lora(
        finetune: Annotated[Path, typer.Argument(help="fine-tuned model (HF dir or safetensors)")],
        out: Annotated[Path, typer.Argument(help="output PEFT adapter directory (atomic)")],
        base: Annotated[Path, typer.Option(help="the base model the fine-tune started from")],
        rank: Annotated[int | None, typer.Option(help="LoRA rank of every module")] = None,
        energy: Annotated[
            float | None,
            typer.Option(help="per-module rank keeping this fraction of Σ s² (e.g. 0.9)"),
        ] = None,
        include: Annotated[
            list[str] | None,
            typer.Option(help="only modules matching this glob (re:REGEX for a regex); repeat"),
        ] = None,
        exclude: Annotated[
            list[str] | None,
            typer.Option(help="skip modules matching this glob (re:REGEX for a regex); repeat"),
        ] = None,
        dtype: Annotated[
            str | None, typer.Option(help="adapter dtype: float32, float16, bfloat16")
        ] = None,
        force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    ) -> None:
        """Extract a LoRA adapter (PEFT format) from FINETUNE relative to --base."""
        import time

        import torch

        from ..errors import RecipeError
        from .lora import extract_lora

        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype is not None and dtype not in dtypes:
            raise RecipeError(f"--dtype must be one of {', '.join(dtypes)}, got '{dtype}'.")
        t0 = time.perf_counter()
        path = extract_lora(
            finetune,
            out,
            base=base,
            rank=rank,
            energy=energy,
            include=include or (),
            exclude=exclude or (),
            dtype=dtypes[dtype] if dtype else None,
            force=force,
        )
        if not quiet:
            typer.echo(f"wrote {path} in {time.perf_counter() - t0:.1f}s")
