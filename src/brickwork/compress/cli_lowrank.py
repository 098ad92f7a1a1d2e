"""``brickwork compress lowrank ...``. Only typer is imported at module level."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer


def lowrank(
    model: Annotated[Path, typer.Argument(help="Hugging Face model directory")],
    out: Annotated[Path, typer.Argument(help="output directory (brickwork format)")],
    method: Annotated[str, typer.Option(help="svd | asvd | svd_llm")] = "svd",
    ratio: Annotated[
        float | None,
        typer.Option(help="keep this fraction of each factorised layer's parameters"),
    ] = None,
    rank: Annotated[int | None, typer.Option(help="the same rank for every layer")] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(help="calibration text file (asvd / svd_llm); repeat for more"),
    ] = None,
    n_examples: Annotated[int, typer.Option(help="examples read per --data file")] = 256,
    batch_size: Annotated[int, typer.Option(help="calibration batch size")] = 8,
    max_length: Annotated[int, typer.Option(help="tokens per example")] = 128,
    alpha: Annotated[float, typer.Option(help="ASVD's exponent on activation scales")] = 0.5,
    include: Annotated[
        list[str] | None, typer.Option(help="glob on module paths to factorise (repeatable)")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="glob on module paths to leave dense (repeatable)")
    ] = None,
    force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing on success")] = False,
) -> None:
    """Factorise the linear layers of MODEL into two smaller ones (plain SVD, ASVD, SVD-LLM).

    By default the Linear / Conv1D layers inside the transformer layers; load the result
    with brickwork.load(OUT)."""
    from ..errors import RecipeError
    from .lowrank import METHODS
    from .lowrank_format import compress_lowrank

    if method not in METHODS:
        from ..errors import did_you_mean

        raise RecipeError(
            f"--method '{method}' is unknown. Known: {', '.join(METHODS)}."
            f"{did_you_mean(method, METHODS)}"
        )
    if (ratio is None) == (rank is None):
        raise RecipeError("give exactly one of --ratio (e.g. 0.8) or --rank (e.g. 64)")
    t0 = time.perf_counter()
    path, params = compress_lowrank(
        model, out, method=method, ratio=ratio, rank=rank, data=data or [],
        n_examples=n_examples, batch_size=batch_size, max_length=max_length, alpha=alpha,
        include=include or None, exclude=exclude or [], force=force,
    )  # fmt: skip
    if not quiet:
        typer.echo(
            f"wrote {path} in {time.perf_counter() - t0:.1f}s: {params['layers_factorised']} of "
            f"{params['layers_selected']} layers factorised, parameters of those "
            f"{params['params_before']:,} -> {params['params_after']:,} "
            f"({100 * params['kept_fraction']:.1f} %)"
        )


def register(app: typer.Typer) -> None:
    """Add the ``lowrank`` command to ``app``."""
    app.command("lowrank")(lowrank)
