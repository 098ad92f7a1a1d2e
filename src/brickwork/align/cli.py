"""``brickwork align A B OUT``: B's units permuted onto A's, written as a model directory.

Only typer is imported at module level; the command imports the rest when it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def align_command(
    model_a: Annotated[Path, typer.Argument(help="the model to align onto (kept as it is)")],
    model_b: Annotated[Path, typer.Argument(help="the model whose units are permuted")],
    out: Annotated[Path, typer.Argument(help="output model directory (created atomically)")],
    method: Annotated[
        str,
        typer.Option(
            help="weight (data-free weight matching), activation (needs --data), ot "
            "(optimal transport; activation cost with --data, else weight cost) or zip "
            "(ZipIt!: writes a merge of A and B, not B aligned; needs --data)"
        ),
    ] = "weight",
    data: Annotated[
        Path | None,
        typer.Option(
            help="calibration data for --method activation / zip (and ot's activation "
            "cost): .txt, .jsonl, .safetensors"
        ),
    ] = None,
    solver: Annotated[
        str,
        typer.Option(
            help="--method ot: emd (exact; equal widths give a permutation, B' computes B) "
            "or sinkhorn (entropic, a soft map: B' no longer computes B exactly)"
        ),
    ] = "emd",
    reg: Annotated[
        float, typer.Option(help="--method ot --solver sinkhorn: entropic regularisation")
    ] = 0.01,
    alpha: Annotated[
        float, typer.Option(help="--method zip: factor on a merged feature's correlations")
    ] = 0.5,
    beta: Annotated[float, typer.Option(help="--method zip: same-model merge budget")] = 0.5,
    n_examples: Annotated[int, typer.Option(help="calibration examples to read")] = 256,
    max_length: Annotated[int, typer.Option(help="tokens per calibration example")] = 128,
    heads: Annotated[bool, typer.Option(help="permute attention heads as whole blocks")] = True,
    within_head: Annotated[
        bool, typer.Option(help="permute dimensions inside heads where positions allow it")
    ] = True,
    residual: Annotated[
        bool, typer.Option(help="also permute the residual stream (couples every layer)")
    ] = False,
    seed: Annotated[int, typer.Option(help="order of weight matching's coordinate descent")] = 0,
    max_iter: Annotated[int, typer.Option(help="most passes of weight matching")] = 100,
    shard_size: Annotated[str, typer.Option(help="largest shard, e.g. 5GB, 500MB")] = "5GB",
    force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Permute the hidden units of model B onto model A's (Git Re-Basin) and write B' at OUT.

    B' computes exactly B's function and loads wherever B did; merging it with A (e.g.
    `brickwork merge` with method linear) then averages matching units, which is what lets
    models trained from different initialisations be merged.

    --method ot transports B onto A (Singh & Jaggi 2020; FFN units and heads as blocks, the
    stream with --residual). With --solver emd and equal widths it is a permutation and B'
    computes B; B with other FFN widths is transported into A's widths (output: A's config).
    --solver sinkhorn gives a soft map: B' then approximates B, it does not compute it.
    --method zip (ZipIt!, Stoica et al. 2024) writes a merge of A and B with A's config; it
    is approximate, and brickwork.json records the calibration loss of A, B, their plain
    average and the zipped model."""
    from brickwork.align.files import AlignOptions, align_files
    from brickwork.errors import AlignError

    if data is not None and method not in ("activation", "ot", "zip"):
        raise AlignError(
            f"--data is calibration data for --method activation, ot or zip; --method {method} "
            "uses none. Drop --data, or pass --method activation."
        )
    spec = None
    if data is not None:
        from brickwork.recipe import DataSpec

        spec = DataSpec(path=str(data), n_examples=n_examples, max_length=max_length)
    options = AlignOptions(
        method=method,
        heads=heads,
        within_head=within_head,
        residual=residual,
        seed=seed,
        max_iter=max_iter,
        solver=solver,
        reg=reg,
        alpha=alpha,
        beta=beta,
    )
    path, result = align_files(
        model_a,
        model_b,
        out,
        options=options,
        data=spec,
        force=force,
        shard_size=shard_size,
        progress=not quiet,
    )
    if not quiet:
        s = result.summary()
        gain = ""
        if "objective_before" in s:
            gain = (
                f"; weight inner product {s['objective_before']:.4g} -> "
                f"{s['objective_after']:.4g} in {s['passes']} passes"
            )
        if method == "zip":
            typer.echo(
                f"wrote {path} (A and B zipped) in {result.seconds:.1f}s: {s['groups']} "
                f"groups; calibration loss {s['calibration_loss']}"
            )
        elif method == "ot":
            typer.echo(
                f"wrote {path} in {result.seconds:.1f}s: {s['groups']} groups transported, "
                f"{s['plans_that_are_permutations']} plans are permutations (B' computes B "
                f"exactly: {s['computes_b_exactly']})"
            )
        else:
            typer.echo(
                f"wrote {path} in {result.seconds:.1f}s: {s['groups']} groups, "
                f"{s['units_moved']} of {s['units']} units moved{gain}"
            )


def register(app: typer.Typer) -> None:
    app.command("align")(align_command)
