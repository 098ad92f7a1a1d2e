"""Bench rows of the data-aware merge methods (``regmean``, ``fisher``, ``regmean_plusplus``,
``adamerging``): each fine-tune's statistics come from its own task's *training* inputs
(never validation or test), AdaMerging adapts on the tasks' unlabelled *validation* inputs
with the fine-tunes' heads fixed; hyperparameters are chosen on validation like every other
merge row and test is read once. Each row records the statistics step: seconds, the
process's peak resident memory during it and before it, examples per model, and whether
the statistics came from the cache (``$BRICKWORK_CACHE/statistics``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import BrickworkError
from .evaluate import MAX_COMBOS, Evaluator, grid, select_hyperparameters
from .suites import Suite, Task
from .train import full_state

#: Calibration examples per fine-tune for the Gram matrices (RegMean, RegMean++): the
#: text suite's last layer runs the [CLS] token only, one row per example, and its widest
#: input (the FFN's, 1536) needs at least as many rows for a well-conditioned Gram matrix.
GRAM_EXAMPLES = 2048
#: Calibration examples per fine-tune for the diagonal Fisher (one backward pass each).
FISHER_EXAMPLES = 256
BATCH = 64
#: AdaMerging on the bench: batches of 16 unlabelled inputs per task and step (the paper's
#: batch size) and 200 Adam steps at the paper's lr 1e-3, where the paper runs 500 (CPU
#: time: 200 steps of eight tasks take about 3 minutes on one core). Measured on the text
#: suite (seed 0, layer-wise): lr 1e-3 keeps 83.4 % normalized, lr 1e-2 74.8 % (the
#: entropy collapses to 0.15 and the merge with it).
ADAMERGING = {"steps": 200, "lr": 1e-3}
ADA_BATCH = 16


def adamerging_combos(combos: list[dict[str, Any]], *, quick: bool) -> list[dict[str, Any]]:
    """The bench's AdaMerging settings (:data:`ADAMERGING`; 10 steps with ``--quick``)
    added to each hyperparameter combination."""
    return [{**c, **ADAMERGING, **({"steps": 10} if quick else {})} for c in combos]


class PeakRSS:
    """Peak resident set size of this process while the block runs (``peak_mb``) and at
    its start (``start_mb``). On Linux the kernel's high-water mark is reset on entry
    (``5`` written to ``/proc/self/clear_refs``) and read on exit (``VmHWM``), so the peak
    is exact; where that is not possible, RSS is sampled every 5 ms instead."""

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self.start_mb: float | None = None
        self._stop = threading.Event()

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def __enter__(self) -> PeakRSS:
        self._start = self._status("VmRSS")
        self._exact = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._exact = True
        except OSError:
            pass
        self._max = self._start

        def sample() -> None:
            while not self._stop.wait(0.005):
                r = self._status("VmRSS")
                if r is not None and self._max is not None:
                    self._max = max(self._max, r)

        self._thread = None
        if not self._exact:
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peak = self._status("VmHWM") if self._exact else self._max
        if self._start is not None:
            self.start_mb = round(self._start / 2**20, 1)
        if peak is not None:
            self.peak_mb = round(peak / 2**20, 1)


def batches(
    suite: Suite, trainer: Any, task: Task, split: str, n: int, size: int = BATCH
) -> list[Any]:
    """The first ``n`` examples of ``task``'s ``split`` (splits are in hash order: a seeded
    sample) as model batches of ``size``."""
    ex = list(trainer.prepared(task, split)[:n])
    return [suite.model_batch(ex[i : i + size]) for i in range(0, len(ex), size)]


def data_rows(
    suite: Suite,
    tasks: list[Task],
    ev: Evaluator,
    finetunes: dict[str, tuple[dict[str, torch.Tensor], nn.Linear]],
    names: Sequence[str],
    *,
    seed: int,
    progress: Any,
    row: Callable[..., dict[str, Any]],
    row_key: Callable[[str], str],
    load_row: Callable[[str], dict[str, Any] | None],
    save_row: Callable[[str, dict[str, Any]], None],
    reused: list[str],
    enc_params: int,
    costs: Any = None,
) -> list[dict[str, Any]]:
    """One row per data-aware method in ``names`` (see the module docstring)."""
    from ..merge.api import merge_state_dicts
    from ..merge.data_aware import run_module_level
    from ..merge.registry import get_method
    from ..stats import StatisticsSource, statistics_for

    trainer = ev.trainer
    base_full = suite.base_state()
    keys = [k for k in base_full if suite.trainable(k)]
    base = {k: base_full[k] for k in keys}
    models = [{k: finetunes[t.name][0][k] for k in keys} for t in tasks]
    heads = [finetunes[t.name][1] for t in tasks]
    head_of = {t.name: h for t, h in zip(tasks, heads)}

    def module(state: dict[str, torch.Tensor]) -> nn.Module:
        enc = suite.new_encoder()
        enc.load_state_dict(full_state(suite, state))
        return enc.eval()

    n_gram, n_fisher = (64, 32) if suite.quick else (GRAM_EXAMPLES, FISHER_EXAMPLES)

    def module_level(m: Any) -> tuple[Callable[[dict[str, Any]], Any], dict[str, Any]]:
        adapt = m.name == "adamerging"  # unlabelled validation inputs, the heads fixed
        split, n, size = ("val", 10**9, ADA_BATCH) if adapt else ("train", n_gram, BATCH)
        data = [batches(suite, trainer, t, split, n, size) for t in tasks]
        encs, base_enc = [module(s) for s in models], module(base)
        extra = {"heads": heads} if adapt else {}
        info: dict[str, Any] = {
            "kinds": list(m.statistics), "split": split, "cached": False,
            "examples_per_model": min(len(trainer.prepared(t, split)) for t in tasks)
            if adapt else n_gram,
        }  # fmt: skip

        def merge(params: dict[str, Any]) -> dict[str, torch.Tensor]:
            with PeakRSS() as rss:
                s0 = time.perf_counter()
                out, _ = run_module_level(
                    m, encs, base=base_enc, data=data, parameters=params, seed=seed, **extra
                )
            info["seconds"] = round(time.perf_counter() - s0, 2)
            info["peak_rss_mb"], info["rss_before_mb"] = rss.peak_mb, rss.start_mb
            st = out.state_dict()
            return full_state(suite, {k: st[k] for k in keys})

        return merge, info

    def tensor_level(m: Any) -> tuple[Callable[[dict[str, Any]], Any], dict[str, Any]]:
        n = n_fisher if "fisher" in m.statistics else n_gram
        with PeakRSS() as rss:
            s0 = time.perf_counter()
            files = {}
            for i, t in enumerate(tasks):
                enc = module(models[i])
                data = batches(suite, trainer, t, "train", n)
                files[f"model{i}"] = {
                    k: statistics_for(
                        enc, data, k, model_hash=trainer.keys[f"finetune:{t.name}"],
                        fisher_estimate="sampled", seed=seed, logits_fn=head_of[t.name],
                        where=f"fine-tune {t.name}",
                    )
                    for k in m.statistics
                }  # fmt: skip
        source = StatisticsSource(files)
        info = {
            "kinds": list(m.statistics), "split": "train", "examples_per_model": n,
            "seconds": round(time.perf_counter() - s0, 2), "peak_rss_mb": rss.peak_mb,
            "rss_before_mb": rss.start_mb,
            "cached": all(f.hit for fs in files.values() for f in fs.values()),
        }  # fmt: skip

        def merge(params: dict[str, Any]) -> dict[str, torch.Tensor]:
            merged = merge_state_dicts(
                m.name, models, base=None if m.base == "none" else base,
                parameters=params, seed=seed, statistics=source,
            )  # fmt: skip
            return full_state(suite, merged)

        return merge, info

    def score_val(state: dict[str, torch.Tensor]) -> dict[str, float]:
        return ev.accuracy(state, head_of, tasks, "val")

    rows: list[dict[str, Any]] = []
    with progress("data-aware merges", len(names)) as bar:
        for name in names:
            m = get_method(name)
            key = row_key(f"merge:{name}")
            cached = load_row(key)
            if cached is not None:
                rows.append(cached)
                reused.append(name)
            else:
                t0 = time.perf_counter()
                sel, err, info = None, None, None
                try:
                    merge, info = (module_level if m.level == "module" else tensor_level)(m)
                    combos = grid(m.search_space, cap=2 if suite.quick else MAX_COMBOS)
                    if name == "adamerging":
                        combos = adamerging_combos(combos, quick=suite.quick)
                    sel = select_hyperparameters(combos, merge, score_val, errors=(BrickworkError,))
                except BrickworkError as e:
                    err = str(e)
                if sel is None or sel.params is None or sel.state is None:
                    why = err if sel is None else sel.error
                    rows.append(row(name, "merge", status="skipped", reason=why,
                                    seconds=round(time.perf_counter() - t0, 2)))  # fmt: skip
                else:
                    correct = ev.correct(sel.state, head_of, tasks, "test")  # the only test read
                    rows.append(row(
                        name, "merge", correct=correct, hyperparameters=sel.params,
                        validation={"avg": round(sel.val_avg, 6), "tried": sel.tried},
                        params=enc_params + sum(p.numel() for h in heads for p in h.parameters()),
                        seconds=round(time.perf_counter() - t0, 2), statistics=info,
                        **(costs.same(sel.state, head_of) if costs is not None else {}),
                    ))  # fmt: skip
                save_row(key, rows[-1])
            if bar is not None:
                bar.advance()
    return rows
