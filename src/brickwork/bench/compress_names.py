"""Names of the compression rows of the benchmark (issue 12), shared by the text / digits
suites (:mod:`brickwork.bench.compress_rows`) and the lm suite
(:mod:`brickwork.bench.lm_compress_rows`).

Each row compresses every fine-tune on its own and scores each task with its own
compressed fine-tune (like ``individual``), so *normalized* is the kept fraction of each
fine-tune's gain over the base.
"""

from __future__ import annotations

from collections.abc import Sequence

#: row name -> (kind, options): ``lora`` (rank), ``prune`` (method, sparsity or N:M),
#: ``lowrank`` (method, parameter ratio kept).
COMPRESS_ROWS: dict[str, tuple[str, dict[str, object]]] = {
    "lora_r8": ("lora", {"rank": 8}),
    "lora_r32": ("lora", {"rank": 32}),
    "lora_r128": ("lora", {"rank": 128}),
    "magnitude_50": ("prune", {"method": "magnitude", "sparsity": 0.5}),
    "wanda_50": ("prune", {"method": "wanda", "sparsity": 0.5}),
    "wanda_2of4": ("prune", {"method": "wanda", "nm": "2:4"}),
    "sparsegpt_50": ("prune", {"method": "sparsegpt", "sparsity": 0.5}),
    "sparsegpt_2of4": ("prune", {"method": "sparsegpt", "nm": "2:4"}),
    "svd_llm_20": ("lowrank", {"method": "svd_llm", "ratio": 0.8}),
    "svd_llm_40": ("lowrank", {"method": "svd_llm", "ratio": 0.6}),
}


def split_compress(methods: Sequence[str] | None) -> tuple[list[str] | None, list[str]]:
    """``(other names or None for all, compression rows in row order)`` from a ``methods``
    list (``None``: every compression row)."""
    if methods is None:
        return None, list(COMPRESS_ROWS)
    wanted = [m for m in COMPRESS_ROWS if m in methods]
    return [m for m in methods if m not in COMPRESS_ROWS], wanted
