"""``brickwork inspect``: what a checkpoint holds, and how two checkpoints differ."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .checkpoint.reader import open_checkpoint


def _human(n: int) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else str(n)
        n /= 1000
    return f"{n:.1f}T"


def inspect_one(path: Path, *, limit: int = 0) -> None:
    ck = open_checkpoint(path)
    table = Table(title=str(path))
    for col in ("tensor", "shape", "dtype", "params"):
        table.add_column(col, justify="right" if col == "params" else "left")
    infos = list(ck.infos())
    for i in infos[: limit or None]:
        table.add_row(
            i.name, str(list(i.shape)), str(i.dtype).removeprefix("torch."), f"{i.numel:,}"
        )
    console = Console()
    console.print(table)
    dtypes = sorted({str(i.dtype).removeprefix("torch.") for i in infos})
    size = sum(i.nbytes for i in infos)
    console.print(
        f"{len(infos)} tensors, {ck.num_parameters:,} parameters ({_human(ck.num_parameters)}), {size / 1e6:,.1f} MB, dtypes: {', '.join(dtypes)}"
    )


def inspect_two(a: Path, b: Path, *, limit: int = 0) -> None:
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    table = Table(title=f"{a}  vs  {b}")
    for col in ("tensor", "shape", "‖a‖", "‖b − a‖", "relative", "cosine", "max |b − a|"):
        table.add_column(col, justify="left" if col in ("tensor", "shape") else "right")
    only_a = [n for n in ca.names if n not in cb]
    only_b = [n for n in cb.names if n not in ca]
    common = [n for n in ca.names if n in cb]
    shown = 0
    tot_delta = tot_a = 0.0
    with torch.inference_mode():
        for n in common:
            ia, ib = ca.info(n), cb.info(n)
            if ia.shape != ib.shape:
                table.add_row(
                    n, f"{list(ia.shape)} vs {list(ib.shape)}", "-", "-", "-", "-", "shape differs"
                )
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
            if not limit or shown < limit:
                table.add_row(
                    n,
                    str(list(ia.shape)),
                    f"{na:.4g}",
                    f"{nd:.4g}",
                    f"{nd / max(na, 1e-12):.3g}",
                    f"{cos:.6f}",
                    f"{d.abs().max().item() if d.numel() else 0:.4g}",
                )
                shown += 1
    console = Console()
    console.print(table)
    console.print(
        f"{len(common)} common tensors; relative difference of all weights ‖b − a‖/‖a‖ = {(tot_delta / max(tot_a, 1e-24)) ** 0.5:.4g}"
    )
    if only_a or only_b:
        console.print(
            f"only in {a}: {len(only_a)} {only_a[:5]}; only in {b}: {len(only_b)} {only_b[:5]}"
        )
