"""``brickwork route ...``: mixture-of-experts commands. Only typer is imported at module level."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

route_app = typer.Typer(
    help="Mixture of experts: upcycle dense fine-tunes into one MoE, or MoEfy one model's FFNs.",
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
    """Build a Mixtral (or, for Qwen2 inputs or a shared expert, Qwen2-MoE) checkpoint at OUT
    whose experts are the FFNs of the RECIPE's fine-tunes; routers: random, hidden,
    cheap_embed, task or train."""
    import time

    from .recipe import upcycle_from_recipe

    t0 = time.perf_counter()
    path = upcycle_from_recipe(
        recipe, out, seed=seed, shard_size=shard_size, force=force, progress=not quiet
    )
    if not quiet:
        typer.echo(f"wrote {path} in {time.perf_counter() - t0:.1f}s")


@route_app.command()
def moefy(
    recipe: Annotated[Path, typer.Argument(help="moefy YAML recipe (model, n_experts, ...)")],
    out: Annotated[Path, typer.Argument(help="output directory (brickwork MoE format, atomic)")],
    force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    seed: Annotated[int | None, typer.Option(help="seed (overrides the recipe's)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing on success")] = False,
) -> None:
    """Split every FFN of a model into experts and train routers (MoEfication); load OUT with
    brickwork.load(OUT)."""
    import time

    from .moefy_recipe import run_moefy

    t0 = time.perf_counter()
    path, report = run_moefy(recipe, out, force=force, seed=seed, progress=not quiet)
    if not quiet:
        m = report["mean"]
        typer.echo(
            f"wrote {path} in {time.perf_counter() - t0:.1f}s; mean over "
            f"{len(report['layers'])} FFNs: router recall {m['router_recall']:.3f}, kept "
            f"activation mass {m['kept_mass']:.3f} (oracle {m['oracle_kept_mass']:.3f}), "
            f"output rel. error {m['output_rel_error']:.3f}"
        )
