"""Agreement of brickwork's layer- and task-wise AdaMerging with FusionBench's, on one tiny model.

Both run on the same tiny encoder (an MLP), the same fine-tunes (the base plus seeded noise),
the same fixed per-task classification heads (FusionBench's CLIP setting) and the same
unlabelled batches, with the same init, Adam lr and number of steps. FusionBench's side is its
own ``LayerWiseAdaMergingAlgorithm.run`` / ``TaskWiseAdaMergingAlgorithm.run``
(``fusion_bench.method.adamerging``: they build its ``LayerWiseMergedModel`` /
``TaskWiseMergedModel`` and run ``test_time_adaptation``), on the CPU, with the two abstract hooks a
program supplies (the loader of each task's unlabelled batches and the logits: encoder, then
head) filled in by a subclass here; the CLIP subclass itself needs CLIP models, processors and
datasets. FusionBench runs in its own virtual environment (never a brickwork dependency), in a
subprocess; the setup goes to it as a ``torch.save`` file read with ``weights_only=True``.

    .venv/bin/python benchmarks/agreement_adamerging.py \
        --fusionbench-python /work/venv-fusionbench/bin/python

Cases: ``interior`` (the paper's lr 1e-3: no λ reaches a bound, so the two must agree to
rounding; ``_eps0``: with Adam's ε = 0 on both sides), ``bounded`` (larger lr: λ run into 0
and 1), ``task_*`` (task-wise) and ``reversal`` (λ reaches a bound and must come back:
brickwork projects λ onto the bounds, FusionBench clamps it in the forward pass only, an
intended difference).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

CASES = {
    "interior": {"init": 0.3, "lr": 1e-3, "steps": 100, "adam_eps": 1e-8},
    "interior_eps0": {"init": 0.3, "lr": 1e-3, "steps": 100, "adam_eps": 0.0},
    "bounded": {"init": 0.3, "lr": 2e-2, "steps": 100, "adam_eps": 1e-8},
    "bounded_fast": {"init": 0.3, "lr": 1e-1, "steps": 100, "adam_eps": 1e-8},
    "task_interior": {"init": 0.3, "lr": 1e-3, "steps": 100, "adam_eps": 1e-8, "mode": "task"},
    "task_interior_eps0": {"init": 0.3, "lr": 1e-3, "steps": 100, "adam_eps": 0.0, "mode": "task"},
    # one linear layer whose mean entropy has its minimum inside (0, 1), at λ = 0.8
    "reversal": {"init": 0.3, "lr": 2e-1, "steps": 80, "adam_eps": 1e-8, "setup": "reversal"},
}
N_TASKS, N_BATCHES, BATCH, D_IN, D_HID, D_FEAT = 3, 4, 16, 16, 32, 24
CLASSES = (5, 7, 10)
HEAD_SCALE = 4.0


@contextlib.contextmanager
def adam_eps(eps: float):
    """Both sides build ``torch.optim.Adam(params, lr=...)``; this sets its ε (default 1e-8)."""
    orig = torch.optim.Adam
    torch.optim.Adam = functools.partial(orig, eps=eps)
    try:
        yield
    finally:
        torch.optim.Adam = orig


def encoder() -> nn.Module:
    return nn.Sequential(
        nn.Linear(D_IN, D_HID),
        nn.GELU(),
        nn.Linear(D_HID, D_HID),
        nn.GELU(),
        nn.Linear(D_HID, D_FEAT),
    )


def make_reversal_setup() -> dict:
    """logits = (W_base + λ τ) x on x = e1, e2: (λ − 0.2)·5v and (λ − 1.4)·5v, v = (1, −1, 0).
    Each example's entropy peaks where its logits vanish (λ = 0.2, 1.4), so their mean has a
    minimum between them, at λ = 0.8; Adam at lr 0.2 overshoots to the bound λ = 1 first."""
    s, v = 5.0, torch.tensor([1.0, -1.0, 0.0])
    w = torch.stack([-0.2 * s * v, -1.4 * s * v], 1)  # (3, 2)
    return {
        "kind": "linear",
        "base": {"weight": w},
        "fine": [{"weight": w + torch.stack([s * v, s * v], 1)}],
        "heads": [],
        "data": [[torch.eye(2)]],
    }


def make_setup() -> dict:
    torch.manual_seed(0)
    base = encoder()
    fine = []
    for t in range(N_TASKS):
        m = copy.deepcopy(base)
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=g))
        fine.append(m.state_dict())
    heads = []
    for c in CLASSES:
        h = nn.Linear(D_FEAT, c)
        with torch.no_grad():
            h.weight.mul_(HEAD_SCALE)  # logits far enough from uniform for entropy to matter
        heads.append(h.state_dict())
    data = [[torch.randn(BATCH, D_IN) for _ in range(N_BATCHES)] for _ in range(N_TASKS)]
    return {"kind": "mlp", "base": base.state_dict(), "fine": fine, "heads": heads, "data": data}


def load_models(setup: dict) -> tuple[nn.Module, list[nn.Module], list[nn.Module]]:
    def build() -> nn.Module:
        return encoder() if setup["kind"] == "mlp" else nn.Linear(2, 3, bias=False)

    base = build()
    base.load_state_dict(setup["base"])
    fine = []
    for sd in setup["fine"]:
        m = build()
        m.load_state_dict(sd)
        fine.append(m)
    heads = []
    for sd, c in zip(setup["heads"], CLASSES):
        h = nn.Linear(D_FEAT, c)
        h.load_state_dict(sd)
        heads.append(h.requires_grad_(False))
    return base, fine, heads


def run_fusionbench(setup: dict, case: dict, log_dir: str) -> dict:
    """FusionBench's own algorithm; runs in FusionBench's virtual environment."""
    import itertools

    import lightning as L
    from fusion_bench.method.adamerging.entropy_loss import entropy_loss
    from fusion_bench.method.adamerging.layer_wise_adamerging import (
        LayerWiseAdaMergingAlgorithm,
    )
    from fusion_bench.method.adamerging.task_wise_adamerging import TaskWiseAdaMergingAlgorithm
    from lightning.fabric.loggers import TensorBoardLogger
    from omegaconf import DictConfig

    base, fine, heads = load_models(setup)
    names = [f"task{t}" for t in range(len(fine))]

    class Pool:  # what run() uses of a ModelPool
        model_names = names

        def load_model(self, name):
            return base if name == "_pretrained_" else fine[names.index(name)]

    task_wise = case.get("mode", "layer") == "task"

    class Algo(TaskWiseAdaMergingAlgorithm if task_wise else LayerWiseAdaMergingAlgorithm):
        """The two hooks a program supplies; everything else is FusionBench's."""

        def __init__(self, config):
            super().__init__(config)
            self.loaders = {n: itertools.cycle(setup["data"][i]) for i, n in enumerate(names)}
            self.losses = []  # mean entropy over tasks per step (FusionBench logs the last task's)
            self._step = []

        def get_shuffled_test_loader_iter(self, task):
            return map(lambda x: (x,), self.loaders[task])  # next() gives a 1-tuple batch

        def compute_logits(self, module, images, task):
            if isinstance(images, tuple):  # the task-wise loop passes the whole batch
                images = images[0]
            logits = module(images)
            if heads:
                logits = heads[names.index(task)](logits)
            self._step.append(entropy_loss(logits).item())
            if len(self._step) == len(names):
                self.losses.append(sum(self._step) / len(names))
                self._step = []
            return logits

    config = DictConfig(
        {
            "init_values": case["init"],
            "weights": None,
            "clamp_weights": True,
            "tie_weights": False,
            "strict": True,
            "optimizer": "adam",
            "lr": case["lr"],
            "max_steps": case["steps"],
            "save_merging_weights": False,
            "fast_dev_run": False,
        }
    )
    algo = Algo(config)
    # run() logs its hyperparameters and each step's metrics: a TensorBoard logger in a temp dir
    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(log_dir))
    if task_wise:
        algo._fabric = fabric  # its __init__ makes a Fabric only when CUDA is available
    else:
        algo.fabric = fabric
    captured = {}
    orig = algo.test_time_adaptation

    def tta(module):
        module = orig(module)
        captured["raw"] = module.merge_weight.detach().clone()
        return module

    algo.test_time_adaptation = tta
    with adam_eps(case["adam_eps"]):
        merged = algo.run(Pool())
    return {
        "lambda_raw": captured["raw"],  # (tasks, layers) or (tasks,), as optimised
        "lambda": captured["raw"].clamp(0, 1),  # what the forward pass uses
        "merged": {k: v.detach().clone() for k, v in merged.state_dict().items()},
        "loss": algo.losses,
        "layers": [n for n, p in base.named_parameters()],
    }


def run_brickwork(setup: dict, case: dict) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from brickwork.merge.adamerging import adamerging

    base, fine, heads = load_models(setup)
    with adam_eps(case["adam_eps"]):
        merged, rep = adamerging(
            base,
            fine,
            setup["data"],
            mode=case.get("mode", "layer"),
            init=case["init"],
            lr=case["lr"],
            steps=case["steps"],
            heads=heads or None,
        )
    lam = torch.tensor(
        [list(d.values()) for d in rep["lambdas"]] if rep["mode"] == "layer" else rep["lambdas"]
    )
    return {
        "lambda": lam,
        "merged": {k: v.detach().clone() for k, v in merged.state_dict().items()},
        "loss": rep["loss"],
        "layers": rep["layers"],
        "seconds": rep["seconds"],
    }


def compare(fb: dict, bw: dict) -> dict:
    assert fb["layers"] == bw["layers"], (fb["layers"], bw["layers"])
    lam_fb, lam_bw = fb["lambda"].double(), bw["lambda"].double()
    raw = fb["lambda_raw"].double()
    w = max(
        (fb["merged"][k].double() - bw["merged"][k].double()).abs().max().item()
        for k in fb["merged"]
    )
    loss = max(abs(a - b) for a, b in zip(fb["loss"], bw["loss"]))
    return {
        "lambda_max_abs_diff": (lam_fb - lam_bw).abs().max().item(),
        "weights_max_abs_diff": w,
        "loss_curve_max_abs_diff": loss,
        "lambda_range": [lam_bw.min().item(), lam_bw.max().item()],
        "lambdas_at_a_bound": int(((lam_bw == 0) | (lam_bw == 1)).sum()),
        "fusionbench_raw_lambdas_outside_0_1": int(((raw < 0) | (raw > 1)).sum()),
        "n_lambdas": lam_bw.numel(),
        "loss_first_last": [bw["loss"][0], bw["loss"][-1]],
        "fusionbench_loss_last": fb["loss"][-1],
        "brickwork_seconds": round(bw["seconds"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fusionbench-python", default="/work/venv-fusionbench/bin/python")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--side", choices=["fusionbench"], help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.side == "fusionbench":  # the subprocess
        setups = torch.load(args.setup, weights_only=True)
        logs = str(Path(args.out).parent / "logs")
        res = {
            name: run_fusionbench(setups[case.get("setup", "mlp")], case, logs)
            for name, case in CASES.items()
        }
        torch.save(res, args.out)
        return
    setups = {"mlp": make_setup(), "reversal": make_reversal_setup()}
    with tempfile.TemporaryDirectory() as tmp:
        s, o = Path(tmp, "setup.pt"), Path(tmp, "fb.pt")
        torch.save(setups, s)
        cmd = [args.fusionbench_python, __file__, "--side", "fusionbench", "--setup", str(s)]
        done = subprocess.run([*cmd, "--out", str(o)], capture_output=True, text=True)
        if done.returncode != 0:  # FusionBench's progress bars are noise unless it failed
            sys.exit(f"FusionBench side failed:\n{done.stderr[-4000:]}")
        fb_all = torch.load(o, weights_only=True)
    fb_version = subprocess.run(
        [
            args.fusionbench_python,
            "-c",
            "import importlib.metadata as m; print(m.version('fusion-bench'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    out = {
        "fusion_bench": fb_version,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads 1",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cases": {},
    }
    for name, case in CASES.items():
        bw = run_brickwork(setups[case.get("setup", "mlp")], case)
        out["cases"][name] = {**case, **compare(fb_all[name], bw)}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
