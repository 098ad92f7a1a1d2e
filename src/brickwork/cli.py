"""The ``brickwork`` command. Subcommands are the verbs; heavy imports happen inside them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .align.cli import register as _register_align
from .bench.cli import register as _register_bench
from .compress.cli import compress_app
from .errors import BrickworkError, Interrupted
from .route.cli import route_app
from .search.cli import register as _register_search

app = typer.Typer(
    name="brickwork",
    help="Take trained networks apart into modules and build new networks from them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="brickwork or mergekit YAML recipe")],
    out: Annotated[Path, typer.Argument(help="output model directory (created atomically)")],
    dtype: Annotated[
        str | None, typer.Option(help="output dtype: float32, float16, bfloat16")
    ] = None,
    shard_size: Annotated[str, typer.Option(help="largest shard, e.g. 5GB, 500MB")] = "5GB",
    seed: Annotated[
        int | None, typer.Option(help="seed for seeded methods (dare_*, della*)")
    ] = None,
    force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    compute_dtype: Annotated[
        str | None,
        typer.Option(
            help="dtype the methods compute in: float32, float64, bfloat16, float16, or input "
            "(each tensor's own); default: the recipe's (brickwork: float32; mergekit: its dtype)"
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(help="where tensors are computed: cpu, cuda, cuda:N, or auto (cuda if any)"),
    ] = "cpu",
) -> None:
    """Merge the checkpoints a RECIPE names into one model at OUT."""
    import time
    import warnings

    from .errors import RegularizedWarning
    from .merge.api import merge as do_merge

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RegularizedWarning)
        path = do_merge(
            recipe,
            out,
            dtype=dtype,
            shard_size=shard_size,
            seed=seed,
            force=force,
            progress=not quiet,
            compute_dtype=compute_dtype,
            device=device,
        )
    for w in caught:  # a ridge added to a singular system: one line, not a source excerpt
        if issubclass(w.category, RegularizedWarning):
            typer.echo(f"warning: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not quiet:
        typer.echo(f"wrote {path} in {time.perf_counter() - t0:.1f}s")


@app.command()
def methods(
    wide: Annotated[
        bool,
        typer.Option(
            "--wide", help="one line per method, every column apart (wider than the terminal)"
        ),
    ] = False,
) -> None:
    """List every merge method with its parameters, defaults and whether it needs a base model."""
    from rich import box
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    from .merge.registry import get_method, list_methods

    def fmt(ps) -> str:
        return ", ".join(f"{p.name}={'required' if p.required else p.default}" for p in ps)

    wide_cols = ["method", "base", "seeded", "per-model parameters", "global parameters",
                 "reference"]  # fmt: skip
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                  show_lines=not wide)  # SIMPLE_HEAD's row lines are blank  # fmt: skip
    for col in wide_cols if wide else ["method", "base", "seeded", "parameters · reference"]:
        table.add_column(col, no_wrap=wide or col != "parameters · reference")
    for name in list_methods(data_aware=True):
        m = get_method(name)
        per_model, glob = fmt(m.per_model_params), fmt(m.global_params)
        cells = [name, m.base, "yes" if m.seeded else "no"]
        if wide:
            table.add_row(*cells, per_model or "-", glob or "-", m.reference)
            continue
        text = Text()
        for label, value in (("per model: ", per_model), ("global: ", glob)):
            if value:
                text.append(label, style="dim").append(value + "\n")
        table.add_row(*cells, text.append(m.reference, style="italic"))
    console = Console()
    if wide:  # as wide as the table: pipe it to `less -S`, or let the terminal wrap
        natural = Measurement.get(console, console.options.update_width(10_000), table)
        console = Console(width=max(console.width, natural.maximum))
    data_aware = sorted(set(list_methods(data_aware=True)) - set(list_methods()))
    console.print(
        Text(
            "merge methods (base: needs a base model; seeded: draws random numbers, --seed; "
            f"{', '.join(data_aware)} need calibration data: a 'data:' block per model)"
        )
    )
    console.print(table)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="checkpoint file or model directory")],
    other: Annotated[
        Path | None, typer.Argument(help="second checkpoint: show per-tensor differences")
    ] = None,
    limit: Annotated[int, typer.Option(help="rows to show (0: all)")] = 0,
) -> None:
    """Print tensors, dtypes and parameter count; with two paths, per-tensor differences."""
    from .inspect import inspect_one, inspect_two

    if other is None:
        inspect_one(path, limit=limit)
    else:
        inspect_two(path, other, limit=limit)


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(help="where to write merged demo models")] = None,
) -> None:
    """Build small demo checkpoints (cached) and merge them with several methods."""
    from .demo import run_demo

    run_demo(out)


_register_align(app)
app.add_typer(route_app, name="route")
app.add_typer(compress_app, name="compress")
_register_bench(app)
_register_search(app)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except BrickworkError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(e.exit_code)
    except Interrupted as e:  # SIGTERM / SIGHUP while writing; the writer said what it did
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # SIGINT outside typer's own handling
        sys.exit(130)


if __name__ == "__main__":
    main()
