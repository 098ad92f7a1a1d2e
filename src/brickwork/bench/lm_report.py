"""Outputs of the LM suite: ``results.json`` (schema below), ``results.md``, ``normalized.png``,
``active_params.png`` (score against active parameters), the recipes of every row, and a
terminal table that fits the console.

``results.json`` (``"schema": "brickwork-bench-lm/2"``) has the text bench's row structure::

    {
      "schema": "brickwork-bench-lm/2", "suite": "lm", "metric": "perplexity",
      "seed": int, "quick": bool, "created": ISO-8601 str,
      "tasks": [{"name": str, "description": str, "packages": {debian package: version},
                 "n_pretrain": int, "n_train": int (documents), "n_val": int, "n_test": int
                 (sequences), "sizes": {...the same, named...}}],
      "skipped_tasks": {domain: one-line reason (the missing package)},
      "train_config": {...LMConfig...}, "model": {"architecture", "vocab_size", "params"},
      "models": {"base" | domain: "models/<name>" (relative to the results)},
      "cache": {"hits": {"base" | domain: bool}, "reused_rows": [str]},
      "bootstrap": {"resamples": int, "seed": int, "level": float},
      "rows": [{
        "method": str,             # base | individual | <merge method> | moe_<router> |
                                   # <compression row> (bench/compress_names.py)
        "kind": "reference" | "merge" | "moe" | "compress", "status": "ok" | "skipped",
        "reason": str | null,
        "per_task": {domain: float},          # test perplexity exp(L)
        "loss_per_task": {domain: float},     # L: mean over test sequences of the mean loss
        "avg": float | null,                  # exp(mean over domains of L): geometric mean
                                              # of the perplexities
        "avg_ci": [lo, hi] | null,            # 95 % bootstrap interval of avg
        "normalized": float | null,           # mean over domains of (L_base - L) / (L_base - L_ft)
        "normalized_ci": [lo, hi] | null,
        "normalized_per_task": {domain: float},
        "vs_linear": "better" | "worse" | "tie" | null,  # paired bootstrap of normalized
        "params": int | null, "active_params": int | null,
        "latency_ms": float | null,           # reference and compression rows: forward time
                                              # per sequence, one fixed validation batch
        "seconds": float | null, "train_seconds": float | null,
        "hyperparameters": {name: value},     # chosen on the validation split
        "validation": null | {"normalized": float, "tried": [{"params", "val_avg" | "error"}]},
        "recipe": null | {...},               # the recipe written to recipes/<method>.yaml
                                              # (data-aware: calibration/<domain>-<n>.safetensors)
        "statistics": null | {...}            # data-aware rows: as in brickwork-bench/4;
                                              # calibrated compression rows: split, examples
      }],
      "environment": {...}, "wall_seconds": float
    }
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import ResultsSchemaError, write_json_and_markdown

SCHEMA_VERSION = "brickwork-bench-lm/2"
SCHEMA_DOC = __doc__
KINDS = ("reference", "merge", "moe", "compress")

_TOP = ("schema", "suite", "metric", "seed", "quick", "created", "tasks", "skipped_tasks",
        "train_config", "model", "models", "cache", "bootstrap", "rows", "environment",
        "wall_seconds")  # fmt: skip
_ROW = ("method", "kind", "status", "reason", "per_task", "loss_per_task", "avg", "avg_ci",
        "normalized", "normalized_ci", "normalized_per_task", "vs_linear", "params",
        "active_params", "latency_ms", "seconds", "train_seconds", "hyperparameters",
        "validation", "recipe", "statistics")  # fmt: skip


def validate(results: dict[str, Any]) -> None:
    """Raise :class:`ResultsSchemaError` listing every deviation from the schema."""
    bad = [f"results: missing '{k}'" for k in _TOP if k not in results]
    bad += [f"results: unexpected key '{k}'" for k in results if k not in _TOP]
    if results.get("schema") != SCHEMA_VERSION:
        bad.append(f"results.schema: expected '{SCHEMA_VERSION}', got {results.get('schema')!r}")
    if results.get("metric") != "perplexity":
        bad.append(f"results.metric: expected 'perplexity', got {results.get('metric')!r}")
    names = sorted(t["name"] for t in results.get("tasks", []))
    for i, r in enumerate(results.get("rows", [])):
        bad += [f"rows[{i}]: missing '{k}'" for k in _ROW if k not in r]
        bad += [f"rows[{i}]: unexpected key '{k}'" for k in r if k not in _ROW]
        if r.get("kind") not in KINDS:
            bad.append(f"rows[{i}].kind: {r.get('kind')!r}")
        if r.get("status") == "ok":
            if sorted(r.get("per_task", {})) != names:
                bad.append(f"rows[{i}].per_task: domains {sorted(r['per_task'])} != {names}")
            for k, v in r.get("per_task", {}).items():
                if not isinstance(v, int | float) or v < 1.0:
                    bad.append(f"rows[{i}].per_task.{k}: {v!r} is not a perplexity (>= 1)")
            ci = r.get("normalized_ci")
            if not (isinstance(ci, list) and len(ci) == 2 and ci[0] <= ci[1]):
                bad.append(f"rows[{i}].normalized_ci: {ci!r} is not [lo, hi]")
        elif r.get("status") != "skipped":
            bad.append(f"rows[{i}].status: {r.get('status')!r} is not 'ok' or 'skipped'")
        if r.get("vs_linear") not in (None, "better", "worse", "tie"):
            bad.append(f"rows[{i}].vs_linear: {r.get('vs_linear')!r}")
    if bad:
        raise ResultsSchemaError("LM results do not match the schema: " + "; ".join(bad))


def write_recipes(results: dict[str, Any], out: Path) -> None:
    """``out/recipes/<method>.yaml`` for every row with a recipe (paths relative to the
    recipe: ``../models/...``), and the router example files the MoE recipes read."""
    import yaml

    d = Path(out) / "recipes"
    d.mkdir(parents=True, exist_ok=True)
    for r in results["rows"]:
        if r["status"] == "ok" and r["recipe"] is not None:
            head = "# brickwork route upcycle" if r["kind"] == "moe" else "# brickwork merge"
            text = (f"{head} {r['method']}.yaml OUT  (from {out}/recipes/)\n"
                    + yaml.safe_dump(r["recipe"], sort_keys=False))  # fmt: skip
            (d / f"{r['method']}.yaml").write_text(text)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _ci(ci: list[float] | None) -> str:
    return "—" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _ppl(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _hp(r: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["hyperparameters"].items())


def _sorted_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    refs = [r for r in results["rows"] if r["kind"] == "reference"]
    rest = [r for r in results["rows"] if r["kind"] != "reference"]
    ok = sorted((r for r in rest if r["status"] == "ok"), key=lambda r: -r["normalized"])
    return refs + ok + [r for r in rest if r["status"] != "ok"]


def markdown(results: dict[str, Any]) -> str:
    tasks = [t["name"] for t in results["tasks"]]
    head = ["method", "kind", "normalized (%)", "95 % CI", "vs linear", *tasks, "avg ppl",
            "params (M)", "active (M)", "latency (ms)", "seconds", "hyperparameters"]  # fmt: skip
    lines = [
        "# brickwork bench — suite `lm`" + (" (quick)" if results["quick"] else ""),
        "",
        "Test perplexity per domain; *normalized* = share of each fine-tune's loss gain the "
        "row keeps, (L_base − L) ÷ (L_base − L_finetune), averaged over domains (base 0 %, "
        "individual 100 %); 95 % bootstrap intervals over test sequences; *vs linear*: paired "
        "bootstrap against averaging. *avg ppl*: exp of the mean loss over domains. "
        "Hyperparameters were chosen on the validation split. *compress* rows: each fine-tune "
        "compressed on its own and scored on its own domain (like *individual*); *params*: "
        "stored parameters over all per-domain models (pruned: non-zeros); *latency*: forward "
        "time per sequence of one fixed batch of 8 validation sequences, fastest of 5 "
        "(pruned weights are stored dense and run at dense speed).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(tasks) + 8) + ["---"]) + "|",
    ]
    skipped = []
    for r in _sorted_rows(results):
        if r["status"] != "ok":
            skipped.append(f"- `{r['method']}`: {r['reason']}")
            continue
        cells = [f"`{r['method']}`", r["kind"], _pct(r["normalized"]), _ci(r["normalized_ci"]),
                 r["vs_linear"] or "", *(_ppl(r["per_task"][t]) for t in tasks), _ppl(r["avg"]),
                 _m(r["params"]), _m(r["active_params"]), _ms(r.get("latency_ms")),
                 f"{r['seconds'] or 0:.1f}", _hp(r)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    worse = [r["method"] for r in results["rows"] if r["vs_linear"] == "worse"]
    if any(r["method"] == "linear" and r["status"] == "ok" for r in results["rows"]):
        lines += ["", "Rows worse than averaging (`linear`) under the paired bootstrap: "
                  + (", ".join(f"`{m}`" for m in worse) if worse else "none") + "."]  # fmt: skip
    if skipped:
        lines += ["", "Skipped:", "", *skipped]
    if results["skipped_tasks"]:
        lines += ["", "Domains skipped:", ""]
        lines += [f"- `{k}`: {v}" for k, v in results["skipped_tasks"].items()]
    m, env, c = results["model"], results["environment"], results["train_config"]
    lines += ["", f"Model: {m['architecture']}, {m['params'] / 1e6:.2f} M parameters, vocab "
              f"{m['vocab_size']} (byte-level BPE trained on the corpus), {c['num_layers']} "
              f"layers, hidden {c['hidden_size']}; pretrained {c['pretrain_steps']} steps, "
              f"fine-tuned {c['finetune_steps']} steps of {c['batch_size']} × {c['seq_len']} "
              "tokens.", "", "Domains (documents pretrain / fine-tune; sequences val / test):", ""]  # fmt: skip
    for t in results["tasks"]:
        pk = ", ".join(f"{p} {v}" for p, v in t["packages"].items())
        lines.append(f"- `{t['name']}`: {t['description']} ({pk}); {t['n_pretrain']} / "
                     f"{t['n_train']}; {t['n_val']} / {t['n_test']}")  # fmt: skip
    lines += ["", "Recipes that rebuild each row from `models/`: `recipes/<method>.yaml` "
              "(`brickwork merge`, or `brickwork route upcycle` for `moe_*`).", "",
              f"Wall time {results['wall_seconds']:.0f} s on {env['processor']} "
              f"({env['cpu_count']} CPUs, {env['torch_threads']} torch threads), python "
              f"{env['python']}, " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)]  # fmt: skip
    return "\n".join(lines) + "\n"


def _m(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f}"


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g}"


def chart(results: dict[str, Any], path: Path) -> None:
    """Merge and MoE rows sorted by normalized score with their 95 % intervals, as bars
    from the ``base`` level (0); ``base`` and ``individual`` (100) as lines; the y-range
    fits the intervals (rows far below the rest are cut and marked with their value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _sorted_rows(results) if r["kind"] != "reference" and r["status"] == "ok"]
    ys = [100 * r["normalized"] for r in rows]
    lo = [100 * r["normalized_ci"][0] for r in rows]
    hi = [100 * r["normalized_ci"][1] for r in rows]
    vals = sorted(lo)
    # the lower edge: the lowest interval, unless a few rows are far below the rest
    floor = vals[min(len(vals) - 1, len(vals) // 4)] if vals else 0.0
    bottom = min(0.0, max(min(lo, default=0.0), floor - 0.5 * (max(hi, default=100) - floor)))
    top = max(100.0, max(hi, default=100.0))
    pad = 0.05 * (top - bottom)
    bottom, top = bottom - pad, top + pad
    colors = {"merge": "tab:blue", "moe": "tab:orange", "compress": "tab:purple"}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2.5), 4.2))
    for i, r in enumerate(rows):
        ax.bar(i, ys[i], color=colors[r["kind"]], width=0.7)  # from the base level (0)
        if ys[i] >= bottom:
            ax.errorbar(i, ys[i], yerr=[[ys[i] - max(lo[i], bottom)], [hi[i] - ys[i]]],
                        color="black", capsize=3, lw=1)  # fmt: skip
        else:
            ax.annotate(f"{ys[i]:.0f}", (i, bottom), xytext=(0, 3), textcoords="offset points",
                        ha="center", fontsize=7)  # fmt: skip
    ax.axhline(100, color="tab:green", lw=1.2, ls="--", label="individual (100)")
    ax.axhline(0, color="tab:red", lw=1.2, ls="--", label="base (0)")
    ax.set_ylim(bottom, top)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["method"] for r in rows], rotation=45, ha="right")
    ax.set_ylabel("loss gain kept (%), 95 % CI")
    ax.set_title("brickwork bench — lm" + (" (quick)" if results["quick"] else ""))
    ax.legend(fontsize="small", loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def params_chart(results: dict[str, Any], path: Path) -> None:
    """Normalized score (95 % interval) against the parameters one token passes through,
    for the MoE rows, the compression rows and the merges (which all have the base's size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["status"] == "ok" and r["kind"] != "reference"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, color in (("merge", "tab:blue"), ("moe", "tab:orange"), ("compress", "tab:purple")):
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        x = [r["active_params"] / 1e6 for r in sel]
        y = [100 * r["normalized"] for r in sel]
        err = [[y[i] - 100 * r["normalized_ci"][0] for i, r in enumerate(sel)],
               [100 * r["normalized_ci"][1] - y[i] for i, r in enumerate(sel)]]  # fmt: skip
        ax.errorbar(x, y, yerr=err, fmt="o", color=color, capsize=3, label=kind)
        if kind in ("moe", "compress"):
            for xi, yi, r in zip(x, y, sel):
                ax.annotate(r["method"].removeprefix("moe_"), (xi, yi), xytext=(4, 2),
                            textcoords="offset points", fontsize=7)  # fmt: skip
    ax.axhline(100, color="tab:green", lw=1.2, ls="--", label="individual (100)")
    ax.axhline(0, color="tab:red", lw=1.2, ls="--", label="base (0)")
    ax.set_xlabel("active parameters per token (M)")
    ax.set_ylabel("loss gain kept (%), 95 % CI")
    ax.set_title("brickwork bench — lm: score vs active parameters")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    out = write_json_and_markdown(results, out, markdown(results))
    chart(results, out / "normalized.png")
    params_chart(results, out / "active_params.png")


def print_table(results: dict[str, Any], console: Any, *, out: Path | None = None) -> None:
    """A table that fits ``console.width``: method, normalized, its interval, vs linear,
    average perplexity, per-domain perplexities, then seconds and hyperparameters, by
    priority; what does not fit is named with a pointer to ``results.md``."""
    from rich.text import Text

    from .._tables import Column, fit, table
    from .report import _abbreviations

    rows = _sorted_rows(results)
    tasks = [t["name"] for t in results["tasks"]]
    ab = _abbreviations(tasks)

    def col(header: str, fmt: Any, priority: int) -> Column:
        return Column(header, [fmt(r) if r["status"] == "ok" else "—" for r in rows], "right",
                      priority)  # fmt: skip

    cols = [
        Column("method", [r["method"] for r in rows], "left", 0),
        col("norm.", lambda r: _pct(r["normalized"]), 1),
        col("95% CI", lambda r: _ci(r["normalized_ci"]), 2),
        col("vs lin", lambda r: r["vs_linear"] or "", 3),
        col("ppl", lambda r: _ppl(r["avg"]), 4),
        *(col(ab[t], lambda r, t=t: _ppl(r["per_task"][t]), 5 + i) for i, t in enumerate(tasks)),
        col("ms", lambda r: _ms(r.get("latency_ms")), 5 + len(tasks)),
        col("s", lambda r: f"{r['seconds'] or 0:.0f}", 6 + len(tasks)),
        Column("hyperparameters", [_hp(r) for r in rows], "left", 7 + len(tasks)),
    ]  # fmt: skip
    kept, dropped = fit(cols, console.width)
    shown = {c.header for c in kept}
    console.print(Text("brickwork bench — lm" + (" (quick)" if results["quick"] else "")
                       + ": loss gain kept %, test perplexity"), style="bold")  # fmt: skip
    console.print(table(kept))
    legend = [f"{a} = {t}" for t, a in ab.items() if a != t and a in shown]
    if legend:
        console.print(Text("domains: " + ", ".join(legend)))
    console.print(
        Text("norm.: (L_base - L) / (L_base - L_finetune), averaged; ppl: exp(mean loss)")
    )
    for r in rows:
        if r["status"] != "ok":
            console.print(Text(f"{r['method']} skipped: {r['reason']}"))
    if dropped:
        where = f"{out}/results.md" if out is not None else "results.md"
        console.print(Text(f"not shown at {console.width} columns: "
                           + ", ".join(c.header for c in dropped) + f"; see {where}"))  # fmt: skip
