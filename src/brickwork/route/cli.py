"""``brickwork route ...``: mixture-of-experts commands. Only typer is imported at module level."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

route_app = typer.Typer(
    help="Mixture of experts: upcycle dense fine-tunes into one MoE checkpoint.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@route_app.command()
def upcycle(
    recipe: Annotated[Path, typer.Argument(help="brickwork or mergekit-moe YAML recipe")],
    out: Annotated[Path, typer.Argument(help="output model directory (created atomically)")],
    force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    seed: Annotated[int | None, typer.Option(help="router seed (overrides the recipe's)")] = None,
    shard_size: Annotated[str, typer.Option(help="largest shard, e.g. 5GB, 500MB")] = "5GB",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing on success")] = False,
) -> None:
    """Build a Mixtral checkpoint at OUT whose experts are the FFNs of the RECIPE's fine-tunes."""
    import time

    from ..errors import RecipeError
    from .recipe import load_upcycle_recipe, resolve_model_path
    from .upcycle import upcycle_to_mixtral

    t0 = time.perf_counter()
    r = load_upcycle_recipe(recipe)
    if r.router_init == "hidden":
        raise RecipeError(
            f"{recipe}: router_init 'hidden' needs per-expert hidden states (prompts run through "
            "the base), which `brickwork route upcycle` does not compute yet; use router_init: "
            "random, or call brickwork.upcycle_to_mixtral(..., router_hidden=...) from Python."
        )
    where = recipe.parent
    path = upcycle_to_mixtral(
        resolve_model_path(r.base, where, where=f"{recipe}: base"),
        [
            resolve_model_path(e.model, where, where=f"{recipe}: experts[{i}]")
            for i, e in enumerate(r.experts)
        ],
        out,
        top_k=r.top_k,
        merge_method=r.merge_method,
        merge_parameters=r.merge_parameters,
        router_init=r.router_init,
        router_std=r.router_std,
        seed=r.seed if seed is None else seed,
        shard_size=shard_size,
        dtype=r.dtype,
        force=force,
    )
    if not quiet:
        typer.echo(f"wrote {path} in {time.perf_counter() - t0:.1f}s")
