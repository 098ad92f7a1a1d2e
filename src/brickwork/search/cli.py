"""``brickwork search CONFIG OUT``: find a merge recipe by evaluation, on Ray, resumable.

Only typer is imported at module level; the command imports the rest when it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def search_command(
    config: Annotated[
        Path, typer.Argument(help="search config (YAML; brickwork's or mergekit-evolve's)")
    ],
    out: Annotated[
        Path, typer.Argument(help="output folder: log, optimiser state, best.yml, report")
    ],
    max_evals: Annotated[
        int | None, typer.Option("--max-evals", help="evaluations in all (overrides max_evals:)")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="continue the search logged in OUT where it stopped")
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(help="join a running Ray cluster (ray start --head); default: a local one"),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Ray workers (default: ray.workers, else every CPU)")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Search a merge method's per-layer parameters by evaluation (CMA-ES, random or TPE).

    Each candidate is an ordinary recipe, merged in memory on a Ray worker and scored on
    validation data; every candidate lands in OUT/search.jsonl as it finishes, so --resume
    after a kill continues where it stopped and reaches the same result. At the end:
    OUT/best.yml (`brickwork merge OUT/best.yml DIR` rebuilds the best model),
    OUT/report.md, OUT/report.json and OUT/scores.png."""
    from rich.console import Console

    from .runner import run_search

    res = run_search(config, out, resume=resume, max_evals=max_evals, ray_address=ray_address,
                     workers=workers, progress=not quiet)  # fmt: skip
    c = Console(width=80)
    r = res.report
    c.print(f"evaluations: {r['evaluations']} ({r['failed']} failed) on {r['workers']} worker(s)")
    c.print(f"best: candidate {res.best['i']}, validation {res.best['score']:.4f}")
    if res.test is not None:
        lo, hi = res.test["interval"]
        c.print(f"test (read once): normalized {res.test['normalized']:.4f} [{lo:.4f}, {hi:.4f}]")
    c.print(f"recipe: {out / 'best.yml'}  report: {out / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("search")(search_command)
