"""``brickwork compress merge-adapters ...``. Only typer is imported at module level."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``merge-adapters`` command to ``app``."""

    @app.command("merge-adapters")
    def merge_adapters_cmd(
        adapters: Annotated[
            list[Path], typer.Argument(help="PEFT LoRA adapter directories of one base")
        ],
        out: Annotated[Path, typer.Option(help="output PEFT adapter directory (atomic)")],
        weight: Annotated[
            list[float] | None,
            typer.Option(help="weight of each adapter, in order (repeat; default 1.0 each)"),
        ] = None,
        combination_type: Annotated[
            str,
            typer.Option(
                "--type",
                help="linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, "
                "dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd",
            ),
        ] = "svd",
        density: Annotated[
            float | None, typer.Option(help="kept fraction for ties / dare / magnitude_prune")
        ] = None,
        majority_sign_method: Annotated[
            str, typer.Option(help="TIES sign election: total or frequency")
        ] = "total",
        svd_rank: Annotated[
            int | None, typer.Option(help="rank of the *_svd results (default: largest input)")
        ] = None,
        svd_clamp: Annotated[
            float | None, typer.Option(help="clamp the SVD factors at this quantile")
        ] = None,
        seed: Annotated[int, typer.Option(help="seed of DARE's random drops")] = 0,
        force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    ) -> None:
        """Merge LoRA adapters into one adapter, as PEFT's add_weighted_adapter does."""
        from ..errors import RecipeError
        from .adapters import merge_adapters

        weights = list(weight) if weight else [1.0] * len(adapters)
        if len(weights) != len(adapters):
            raise RecipeError(
                f"--weight given {len(weights)} times for {len(adapters)} adapters; give one "
                "per adapter, in order (or none for 1.0 each)."
            )
        merged = merge_adapters(
            adapters,
            weights,
            combination_type,  # type: ignore[arg-type]  (checked, with the valid names)
            density=density,
            majority_sign_method=majority_sign_method,  # type: ignore[arg-type]
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            seed=seed,
        )
        path = merged.save(out, force=force)
        if not quiet:
            typer.echo(f"wrote {path} (rank {merged.config['r']}, {combination_type})")
