"""``brickwork inspect``: what a checkpoint holds, and how two checkpoints differ.

The tables fit the terminal (:mod:`._tables`): a tensor name is never cut. Where the
names and the other columns do not fit side by side, the other columns are compacted
(``4096×4096``, ``bf16``, ``16.8M``), then dropped by priority; where even that leaves
too little, each name goes on its own line with its values below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text

from ._tables import INDENT, Column, fit, print_folded, table, width_of
from .checkpoint.reader import open_checkpoint


def _human(n: int) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else str(n)
        n /= 1000
    return f"{n:.1f}T"


def _dtype(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _short_dtype(dt: torch.dtype) -> str:
    """float32 -> f32, bfloat16 -> bf16, int64 -> i64, uint8 -> u8; others unchanged."""
    return _dtype(dt).replace("float", "f").replace("uint", "u").replace("int", "i")


def _shape(shape: Sequence[int], *, compact: bool) -> str:
    if compact:  # (4096, 4096) -> 4096×4096
        return "×".join(map(str, shape)) or "[]"
    return str(list(shape))


def _print_rows(
    console: Any, keys: list[str], candidates: Sequence[Sequence[Column]], *, keep: int
) -> list[Column]:
    """Print ``keys`` (tensor names, never cut) with the first candidate column set that
    fits beside them, widest first; else the last candidate cut down by priority, if that
    keeps ``keep`` columns; else folded (each name on its own line). Returns the columns
    that were not shown."""
    name = Column("tensor", keys, "left")
    for cols in candidates:
        if width_of([name, *cols]) <= console.width:
            console.print(table([name, *cols]))
            return []
    kept, dropped = fit([name, *candidates[-1]], console.width)
    if len(kept) > keep:
        console.print(table(kept))
        return dropped
    avail = console.width - INDENT
    cols = next((c for c in candidates if width_of(c) <= avail), None)
    if cols is not None:
        print_folded(console, "tensor", keys, cols)
        return []
    kept, dropped = fit(candidates[-1], avail)
    print_folded(console, "tensor", keys, kept)
    return dropped


def _say(console: Any, text: str, **kw: Any) -> None:
    console.print(Text(text), **kw)


def _not_shown(console: Any, dropped: list[Column]) -> None:
    if dropped:
        _say(
            console,
            f"not shown at {console.width} columns: {', '.join(c.header for c in dropped)} "
            "(a wider terminal, or COLUMNS=160, shows them)",
        )


def inspect_one(path: Path, *, limit: int = 0, console: Any = None) -> None:
    console = console or Console()
    ck = open_checkpoint(path)
    infos = list(ck.infos())
    shown = infos[: limit or None]
    dtypes = sorted({_dtype(i.dtype) for i in infos})
    one_dtype = len({_dtype(i.dtype) for i in shown}) <= 1

    def cols(*, compact: bool, dtype: bool = True) -> list[Column]:
        return [
            Column("shape", [_shape(i.shape, compact=compact) for i in shown], "left", 2),
            *(
                [Column("dtype", [(_short_dtype if compact else _dtype)(i.dtype) for i in shown],
                        "left", 3)]
                if dtype else []
            ),
            Column("params", [_human(i.numel) if compact else f"{i.numel:,}" for i in shown],
                   "right", 1),
        ]  # fmt: skip

    candidates = [cols(compact=False), cols(compact=True)]
    if one_dtype:  # the summary line names it
        candidates.append(cols(compact=True, dtype=False))
    _say(console, str(path), style="bold")
    dropped = _print_rows(console, [i.name for i in shown], candidates, keep=len(candidates[-1]))
    size = sum(i.nbytes for i in infos)
    _say(
        console,
        f"{len(infos)} tensors, {ck.num_parameters:,} parameters ({_human(ck.num_parameters)}), "
        f"{size / 1e6:,.1f} MB, dtypes: {', '.join(dtypes)}"
        + (f" (first {len(shown)} shown)" if len(shown) < len(infos) else ""),
    )
    _not_shown(console, dropped)


def inspect_two(a: Path, b: Path, *, limit: int = 0, console: Any = None) -> None:
    console = console or Console()
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    only_a = [n for n in ca.names if n not in cb]
    only_b = [n for n in cb.names if n not in ca]
    common = [n for n in ca.names if n in cb]
    rows: list[tuple[str, Sequence[int], list[str]]] = []
    mismatched: list[str] = []
    tot_delta = tot_a = 0.0
    with torch.inference_mode():
        for n in common:
            ia, ib = ca.info(n), cb.info(n)
            if ia.shape != ib.shape:
                mismatched.append(f"{n}: {list(ia.shape)} vs {list(ib.shape)}")
                continue
            x, y = ca.get(n).double().reshape(-1), cb.get(n).double().reshape(-1)
            d = y - x
            na, nd = x.norm().item(), d.norm().item()
            tot_delta += nd**2
            tot_a += na**2
            cos = (
                torch.nn.functional.cosine_similarity(x, y, dim=0, eps=1e-12).item()
                if x.numel()
                else 1.0
            )
            if not limit or len(rows) < limit:
                stats = [f"{na:.4g}", f"{nd:.4g}", f"{nd / max(na, 1e-12):.3g}", f"{cos:.6f}",
                         f"{d.abs().max().item() if d.numel() else 0:.4g}"]  # fmt: skip
                rows.append((n, ia.shape, stats))

    def cols(*, compact: bool) -> list[Column]:
        heads = [("‖a‖", 5), ("‖b − a‖", 3), ("relative", 1), ("cosine", 2), ("max |b − a|", 4)]
        return [
            Column("shape", [_shape(s, compact=compact) for _, s, _ in rows], "left", 6),
            *(Column(h, [st[j] for *_, st in rows], "right", p) for j, (h, p) in enumerate(heads)),
        ]

    _say(console, f"{a}  vs  {b}", style="bold")
    candidates = [cols(compact=False), cols(compact=True)]
    dropped = _print_rows(console, [n for n, *_ in rows], candidates, keep=2)
    _say(
        console,
        f"{len(common)} common tensors; relative difference of all weights ‖b − a‖/‖a‖ = "
        f"{(tot_delta / max(tot_a, 1e-24)) ** 0.5:.4g}",
    )
    if mismatched:
        _say(console, f"{len(mismatched)} common tensors differ in shape (not compared):")
        for line in mismatched:
            _say(console, "  " + line, soft_wrap=True)
    for where, names in ((a, only_a), (b, only_b)):
        if names:
            _say(console, f"only in {where}: {len(names)} tensors", soft_wrap=False)
            for n in names[:5]:
                _say(console, "  " + n, soft_wrap=True)
            if len(names) > 5:
                _say(console, f"  and {len(names) - 5} more")
    _not_shown(console, dropped)
