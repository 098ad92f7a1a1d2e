"""The ``brickwork bench`` command. Register it on the main Typer app with
``app.command("bench")(brickwork.bench.cli.bench)`` (or :func:`register`)."""

from __future__ import annotations

from pathlib import Path

import typer


def _split(v: str | None) -> list[str] | None:
    return [x.strip() for x in v.split(",") if x.strip()] if v else None


def bench(
    suite: str = typer.Option(
        "text",
        "--suite",
        help="Suite: text (default), digits, lm, or digits-scratch (the digits networks trained "
        "from scratch from different initialisations; rows: naive linear and aligned or fused "
        "merges: align+linear, align+ties, align_act+linear, ot_fusion, ot_fusion_act, zipit).",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Output directory (default: bench-results/SUITE-DATE)."
    ),
    quick: bool = typer.Option(False, "--quick", help="Few steps and examples: a smoke test."),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated task names."),
    methods: str | None = typer.Option(
        None,
        "--methods",
        help="Comma-separated merge methods, MoE rows (moe_task, moe_train, moefy_top4of8, "
        "moefy_top2of8), compression rows (lora_r8, lora_r32, lora_r128, magnitude_50, "
        "wanda_50, wanda_2of4, sparsegpt_50, sparsegpt_2of4, svd_llm_20, svd_llm_40) and "
        "alignment rows (align+linear, align+ties, align_act+linear, "
        "ot_fusion, ot_fusion_act, zipit); default: all but the alignment rows "
        "(digits-scratch: linear and the alignment rows).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of splits, training and merges."),
    seeds: str | None = typer.Option(
        None,
        "--seeds",
        help="Comma-separated training seeds, e.g. 0,1,2: the bench once per seed on the "
        "splits of --seed (fine-tunes and merges redone), and mean ± std across seeds per row "
        "(costs one run per seed).",
    ),
    no_moe: bool = typer.Option(False, "--no-moe", help="Leave out the MoE rows."),
    jobs: int | None = typer.Option(
        None, "--jobs", min=1, help="Processes training fine-tunes (default: 2; 1 with --quick)."
    ),
    threads: int = typer.Option(
        1, "--threads", min=1, help="Torch threads (default 1: more than free cores is slower)."
    ),
) -> None:
    """Fine-tune (cached), merge with every method, build MoEs of the fine-tunes, evaluate;
    write JSON, Markdown and a chart."""
    if suite == "lm":  # the language-model suite has its own runner (bench/lm.py)
        from .lm import run_lm_bench

        if seeds is not None:
            raise typer.BadParameter(
                "the lm suite runs one seed (--seed); --seeds is for the text and digits suites",
                param_hint="--seeds",
            )

        run_lm_bench(out=out, quick=quick, tasks=_split(tasks), methods=_split(methods),
                     seed=seed, moe=not no_moe, jobs=jobs, threads=threads)  # fmt: skip
        return
    from .runner import run_bench

    run_bench(suite, out=out, quick=quick, tasks=_split(tasks), methods=_split(methods),
              seed=seed, moe=not no_moe, jobs=jobs, threads=threads,
              seeds=_seeds(seeds))  # fmt: skip


def _seeds(v: str | None) -> list[int] | None:
    try:
        return [int(x) for x in _split(v) or []] or None
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {v!r}",
                                 param_hint="--seeds") from None  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
