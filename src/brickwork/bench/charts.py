"""The bench's two charts (matplotlib, written by :func:`brickwork.bench.report.write`).

``normalized.png``
    Every ok row but the two levels, sorted by normalized accuracy (best first), a point
    with its 95 % bootstrap interval as an error bar, coloured by kind; ``individual``
    (100 % by definition) and ``base`` as horizontal lines, ``linear`` as a dotted one;
    the y-range runs from a little below the lowest interval (or ``base``) to a little
    above the highest (or 100 %), so differences of a point are visible.
``params.png``
    Normalized accuracy (with intervals) against active parameters per example: the MoE
    (and later compression) rows coloured and named, the dense rows as grey reference
    points (the merges all sit at one x; the best one and ``linear`` are named).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"reference": "#555555", "merge": "#1f77b4", "moe": "#d62728", "compress": "#2ca02c"}
LEVELS = ("base", "individual")  # drawn as lines, not points


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["rows"] if r["status"] == "ok" and r["normalized"] is not None]


def _yerr(rows: list[dict[str, Any]]) -> list[list[float]]:
    """Matplotlib's ``yerr`` (distances below and above, in %) from ``normalized_ci``."""
    lo = [100 * (r["normalized"] - (r["normalized_ci"] or [r["normalized"]] * 2)[0]) for r in rows]
    hi = [100 * ((r["normalized_ci"] or [r["normalized"]] * 2)[1] - r["normalized"]) for r in rows]
    return [[max(v, 0.0) for v in lo], [max(v, 0.0) for v in hi]]


def _limits(rows: list[dict[str, Any]], levels: list[float]) -> tuple[float, float]:
    """A y-range (in %) holding every interval and level, with a margin of 8 % of it."""
    los = [100 * (r["normalized_ci"] or [r["normalized"]])[0] for r in rows] + levels
    his = [100 * (r["normalized_ci"] or [r["normalized"]])[-1] for r in rows] + levels
    lo, hi = min(los), max(his)
    pad = max(0.08 * (hi - lo), 0.5)
    return lo - pad, hi + pad


def normalized_chart(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    ok = _ok(results)
    level = {r["method"]: 100 * r["normalized"] for r in ok if r["method"] in LEVELS}
    rows = sorted((r for r in ok if r["method"] not in LEVELS), key=lambda r: -r["normalized"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * len(rows) + 2.5), 4.2))
    xs = list(range(len(rows)))
    for kind, colour in COLOURS.items():
        idx = [i for i, r in enumerate(rows) if r["kind"] == kind]
        if not idx:
            continue
        sub = [rows[i] for i in idx]
        ax.errorbar(idx, [100 * r["normalized"] for r in sub], yerr=_yerr(sub), fmt="o",
                    color=colour, ecolor=colour, elinewidth=1.2, capsize=3, ms=5,
                    label=kind)  # fmt: skip
    styles = {"individual": ("black", "-"), "base": ("#888888", "--")}
    for name, y in level.items():
        colour, ls = styles[name]
        ax.axhline(y, color=colour, ls=ls, lw=1.0, zorder=0)
        ax.annotate(f"{name} {y:.1f}", (1.0, y), xycoords=("axes fraction", "data"),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=8,
                    color=colour)  # fmt: skip
    lin = next((r for r in rows if r["method"] == "linear"), None)
    if lin is not None:
        ax.axhline(100 * lin["normalized"], color=COLOURS["merge"], ls=":", lw=0.9, zorder=0)
    ax.set_xticks(xs)
    marks = {"better": " +", "worse": " −", "tie": ""}
    ax.set_xticklabels([r["method"] + marks.get(r["vs_linear"] or "", "") for r in rows],
                       rotation=50, ha="right", fontsize=8)  # fmt: skip
    if rows:
        ax.set_ylim(*_limits(rows, list(level.values())))
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("normalized accuracy (%)")
    ax.grid(axis="y", color="#e5e5e5", lw=0.6)
    ax.set_axisbelow(True)
    quick = " (quick)" if results["quick"] else ""
    ax.set_title(f"brickwork bench — {results['suite']}{quick}: normalized accuracy, 95 % "
                 "bootstrap intervals\n(+ / −: better / worse than linear, paired; dotted: "
                 "linear)", fontsize=9)  # fmt: skip
    ax.legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def params_chart(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = [r for r in _ok(results) if r["active_params"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = [r for r in rows if r["kind"] in ("reference", "merge")]
    sparse = [r for r in rows if r["kind"] not in ("reference", "merge")]
    merges = [r for r in dense if r["kind"] == "merge"]
    named = [r for r in dense if r["kind"] == "reference"]
    named += [r for r in merges if r["method"] == "linear"]
    if merges:
        best = max(merges, key=lambda r: r["normalized"])
        named += [best] if best["method"] != "linear" else []
    rest = [r for r in merges if r not in named]  # small dots, no bars: they share one x
    if rest:
        ax.plot([r["active_params"] / 1e6 for r in rest], [100 * r["normalized"] for r in rest],
                "o", color="#c4c4c4", ms=3.5, label="other merges")  # fmt: skip
    for group, colour, label in ((named, "#7a7a7a", "dense (references, linear, best merge)"),
                                 (sparse, COLOURS["moe"], "MoE / compressed")):  # fmt: skip
        if group:
            ax.errorbar([r["active_params"] / 1e6 for r in group],
                        [100 * r["normalized"] for r in group], yerr=_yerr(group), fmt="o",
                        color=colour, ecolor=colour, capsize=2, ms=5, label=label)  # fmt: skip
    if rows:
        lo, hi = _limits(rows, [])
        ax.set_ylim(lo, hi)
        for r, y in _spread([*named, *sparse], gap=0.045 * (hi - lo)):
            ax.annotate(r["method"], (r["active_params"] / 1e6, 100 * r["normalized"]),
                        xytext=(6, y), textcoords=("offset points", "data"), fontsize=7,
                        va="center")  # fmt: skip
        lo, hi = (
            min(r["active_params"] for r in rows) / 1e6,
            max(r["active_params"] for r in rows) / 1e6,
        )
        if hi / lo > 8:
            ax.set_xscale("log")
            ax.set_xlim(lo / 1.3, hi * 2.5)  # room for the names on the right
        else:
            pad = 0.15 * (hi - lo) or 0.1 * hi
            ax.set_xlim(lo - pad, hi + 2.5 * pad)
    ax.set_xlabel("active parameters per example (M)")
    ax.set_ylabel("normalized accuracy (%)")
    ax.grid(color="#e5e5e5", lw=0.6)
    ax.set_axisbelow(True)
    ax.set_title(f"brickwork bench — {results['suite']}: accuracy vs active parameters",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spread(rows: list[dict[str, Any]], gap: float) -> list[tuple[dict[str, Any], float]]:
    """Each row with the y (in %) of its label: labels of points at about the same x are
    pushed apart to at least ``gap``."""
    out: list[tuple[dict[str, Any], float]] = []
    groups: dict[float, list[dict[str, Any]]] = {}
    for r in rows:
        key = next((k for k in groups if abs(k - r["active_params"]) <= 0.02 * k), None)
        groups.setdefault(key if key is not None else r["active_params"], []).append(r)
    for group in groups.values():
        ys: list[float] = []
        for r in sorted(group, key=lambda r: r["normalized"]):
            y = 100 * r["normalized"]
            ys.append(max(y, ys[-1] + gap) if ys else y)
            out.append((r, ys[-1]))
    return out
