"""``brickwork compress prune ...``. Only typer is imported at module level."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``prune`` command to ``app``."""

    @app.command()
    def prune(
        model: Annotated[Path, typer.Argument(help="Hugging Face model directory to prune")],
        out: Annotated[Path, typer.Argument(help="output model directory (created atomically)")],
        method: Annotated[
            str, typer.Option(help="magnitude, wanda (needs --data) or sparsegpt (needs --data)")
        ] = "magnitude",
        sparsity: Annotated[
            float | None,
            typer.Option(help="fraction of weights set to zero, in [0, 1) (unstructured)"),
        ] = None,
        nm: Annotated[
            str | None,
            typer.Option(
                "--nm",
                help="N:M pattern, e.g. 2:4: at most N non-zeros in every M consecutive "
                "input weights of a row (NVIDIA's convention; 2:4 keeps 2 of 4)",
            ),
        ] = None,
        scope: Annotated[
            str, typer.Option(help="magnitude only: layer (each tensor) or global (one threshold)")
        ] = "layer",
        data: Annotated[
            list[Path] | None,
            typer.Option(
                help="calibration text file (.txt, .jsonl or .safetensors of input_ids); "
                "repeat for several"
            ),
        ] = None,
        n_examples: Annotated[int, typer.Option(help="examples read per data file")] = 128,
        max_length: Annotated[int, typer.Option(help="tokens per example")] = 128,
        batch_size: Annotated[int, typer.Option(help="examples per forward pass")] = 8,
        sequential: Annotated[
            bool | None,
            typer.Option(
                "--sequential/--no-sequential",
                help="measure each layer's inputs on the already-pruned previous layers "
                "(default: on for sparsegpt, off for wanda)",
            ),
        ] = None,
        structured: Annotated[
            str | None,
            typer.Option(
                help="remove whole units from the shapes instead: ffn, heads or ffn+heads "
                "(--ratio; --method magnitude or wanda as importance)"
            ),
        ] = None,
        ratio: Annotated[
            float | None,
            typer.Option(help="--structured: kept fraction of FFN units / heads per layer"),
        ] = None,
        shard_size: Annotated[str, typer.Option(help="largest shard, e.g. 5GB, 500MB")] = "5GB",
        force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress lines")] = False,
    ) -> None:
        """Prune the linear layers inside MODEL's transformer layers and write it to OUT."""
        import json
        import time

        from .prune import prune as do_prune

        t0 = time.perf_counter()
        if structured is not None:
            from .structured import run_structured_cli

            typer.echo(
                run_structured_cli(
                    model, out, structured=structured, ratio=ratio, method=method,
                    sparsity=sparsity, nm=nm, data=data or [], n_examples=n_examples,
                    batch_size=batch_size, max_length=max_length, force=force,
                    shard_size=shard_size, t0=t0,
                )
            )  # fmt: skip
            return
        if ratio is not None:
            from ..errors import RecipeError

            raise RecipeError("--ratio applies to --structured pruning; use --sparsity here.")
        done = do_prune(
            model,
            out,
            method=method,  # type: ignore[arg-type]
            sparsity=sparsity,
            nm=nm,
            scope=scope,  # type: ignore[arg-type]
            data=data or [],
            n_examples=n_examples,
            batch_size=batch_size,
            max_length=max_length,
            sequential=sequential,
            force=force,
            shard_size=shard_size,
            progress=not quiet,
        )
        rec = json.loads((done / "brickwork.json").read_text())
        ms = rec["measured_sparsity"]
        typer.echo(
            f"wrote {done}: {method}, {ms['pruned_tensors']} tensors pruned, measured "
            f"sparsity {ms['overall']:.4f} ({time.perf_counter() - t0:.1f} s)"
        )
