"""Training for the benchmark: linear probes, fine-tunes, the multitask model, and their cache.

A fine-tune is a linear probe on frozen base features (L-BFGS, to convergence) followed by
a full fine-tune of encoder and head starting from that probe (LP-FT), so every task head
stays compatible with encoders near the base. Results are cached under
``$BRICKWORK_CACHE/bench/<hash>/`` (default ``.cache/brickwork``), keyed by a hash of
everything that determines them: suite, tasks and their data, seed, training config, the
base checksum, torch's version and :data:`CODE_VERSION`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .suites import Suite, Task

#: Bump when a change to this package changes what training produces.
CODE_VERSION = "bench-train-2"

Progress = Callable[[str, int], Any]  # (description, total) -> context manager with .advance()


def cache_root() -> Path:
    return Path(os.environ.get("BRICKWORK_CACHE", ".cache/brickwork")) / "bench"


def cache_key(**parts: Any) -> str:
    blob = json.dumps({"code": CODE_VERSION, "torch": torch.__version__, **parts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_cached(key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    from safetensors.torch import load_file

    d = cache_root() / key
    if not (d / "meta.json").exists():
        return None
    return load_file(str(d / "tensors.safetensors")), json.loads((d / "meta.json").read_text())


def save_cached(key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write atomically: a temp dir next to the entry, then one rename."""
    from safetensors.torch import save_file

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    try:
        os.replace(tmp, root / key)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- features


def batches(suite: Suite, prepared: Sequence[Any], size: int) -> Iterator[tuple[list[int], Any]]:
    """Evaluation batches, sorted by length to minimise padding: ``(indices, batch)``."""
    order = sorted(range(len(prepared)), key=lambda i: suite.length(prepared[i]))
    for s in range(0, len(order), size):
        idx = order[s : s + size]
        yield idx, suite.collate([prepared[i] for i in idx])


@torch.no_grad()
def features(suite: Suite, encoder: nn.Module, prepared: Sequence[Any]) -> torch.Tensor:
    encoder.eval()
    out = torch.empty(len(prepared), suite.feature_dim)  # (examples, feature_dim)
    for idx, batch in batches(suite, prepared, 128):
        out[idx] = encoder(batch).float()
    return out


def train_probe(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, *, iters: int, l2: float, seed: int
) -> nn.Linear:
    """Multinomial logistic regression on standardised-by-the-loss features, by L-BFGS."""
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], n_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head


# ----------------------------------------------------------------------------- fine-tuning


def _schedule(
    opt: torch.optim.Optimizer, steps: int, warmup: float
) -> torch.optim.lr_scheduler.LambdaLR:
    w = max(1, int(steps * warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / w, max(0.0, (steps - s) / max(1, steps - w)))
    )


def _sampler(n: int, batch: int, gen: torch.Generator) -> Iterator[list[int]]:
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for s in range(0, n - batch + 1 if n >= batch else 1, batch):
            yield perm[s : s + batch]


def _train(
    suite: Suite,
    tasks: list[Task],
    heads: dict[str, nn.Linear],
    prepared: dict[str, list[Any]],
    *,
    steps: int,
    seed: int,
    progress: Progress | None,
    label: str,
) -> tuple[dict[str, torch.Tensor], dict[str, nn.Linear]]:
    """Train encoder + heads, one task per step round-robin; returns the trained tensors."""
    cfg = suite.config
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    enc = suite.start_encoder(tasks, seed)
    enc.train()
    params = []
    for n, p in enc.named_parameters():
        p.requires_grad_(suite.trainable(n))
        if p.requires_grad:
            params.append(p)
    heads = {k: _copy_head(h) for k, h in heads.items()}
    head_params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(
        [{"params": params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}],
        weight_decay=cfg.weight_decay,
    )
    sched = _schedule(opt, steps, cfg.warmup)
    labels = {t.name: torch.tensor(t.splits["train"].labels) for t in tasks}
    samplers = {t.name: _sampler(len(labels[t.name]), cfg.batch_size, gen) for t in tasks}
    bar = progress(label, steps) if progress else nullcontext()
    with bar as b:
        for step in range(steps):
            t = tasks[step % len(tasks)].name
            idx = next(samplers[t])
            logits = heads[t](enc(suite.collate([prepared[t][i] for i in idx])))
            loss = nn.functional.cross_entropy(logits, labels[t][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params + head_params, 1.0)
            opt.step()
            sched.step()
            if b is not None:
                b.advance()
    enc.eval()
    trained = {k: v.detach().clone() for k, v in enc.state_dict().items() if suite.trainable(k)}
    return trained, heads


def _copy_head(h: nn.Linear) -> nn.Linear:
    new = nn.Linear(h.in_features, h.out_features)
    new.load_state_dict(h.state_dict())
    return new


def head_tensors(heads: dict[str, nn.Linear], prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.{t}.{k}": v.detach() for t, h in heads.items() for k, v in h.state_dict().items()
    }


def heads_from(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, nn.Linear]:
    out: dict[str, nn.Linear] = {}
    for k in tensors:
        if k.startswith(prefix + ".") and k.endswith(".weight"):
            task = k[len(prefix) + 1 : -len(".weight")]
            w, b = tensors[k], tensors[f"{prefix}.{task}.bias"]
            h = nn.Linear(w.shape[1], w.shape[0])
            h.load_state_dict({"weight": w, "bias": b})
            out[task] = h
    return out


def full_state(suite: Suite, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's whole state dict: trained tensors, and the base for the frozen ones."""
    return {k: trained.get(k, v) for k, v in suite.base_state().items()}


class Trainer:
    """Probes, fine-tunes and the multitask model of one suite, cached. ``seed``: of the
    training (initialisation, batch order); default the suite's seed, which also draws its
    splits: another ``seed`` retrains on the same data."""

    def __init__(
        self, suite: Suite, *, progress: Progress | None = None, seed: int | None = None
    ) -> None:
        self.suite, self.progress = suite, progress
        self.seed = suite.seed if seed is None else seed
        self.base_sum = suite.base_checksum()
        self._prepared: dict[tuple[str, str], list[Any]] = {}
        self.timings: dict[str, float] = {}  # key -> seconds it took to train (from meta)
        self.cache_hits: dict[str, bool] = {}
        self.keys: dict[str, str] = {}  # name -> cache key of what was trained

    def prepared(self, task: Task, split: str) -> list[Any]:
        if (task.name, split) not in self._prepared:
            self._prepared[task.name, split] = self.suite.prepare(task.splits[split])
        return self._prepared[task.name, split]

    def _key(self, kind: str, tasks: list[Task]) -> str:
        return cache_key(
            kind=kind,
            suite=self.suite.name,
            encoder=self.suite.describe(),
            quick=self.suite.quick,
            tasks=[(t.name, t.fingerprint()) for t in tasks],
            seed=self.seed,
            config=asdict(self.suite.config),
            base=self.base_sum,
        )

    def _cached(
        self,
        name: str,
        key: str,
        make: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]],
    ) -> dict[str, torch.Tensor]:
        self.keys[name] = key
        hit = load_cached(key)
        made = hit is None
        if hit is None:
            t0 = time.perf_counter()
            tensors, meta = make()
            meta = {**meta, "train_seconds": round(time.perf_counter() - t0, 2), "key": key}
            save_cached(key, tensors, meta)
            hit = (tensors, meta)
        self.cache_hits.setdefault(name, not made)  # the first request decides
        self.timings[name] = float(hit[1].get("train_seconds", 0.0))
        return hit[0]

    def probe(self, task: Task) -> nn.Linear:
        """The linear probe of ``task`` on frozen base features."""
        key = self._key("probe", [task])

        def make() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            start = self.suite.start_encoder([task], self.seed)
            x = features(self.suite, start, self.prepared(task, "train"))
            y = torch.tensor(task.splits["train"].labels)
            cfg = self.suite.config
            h = train_probe(
                x,
                y,
                len(task.classes),
                iters=cfg.probe_iters,
                l2=cfg.probe_l2,
                seed=self.seed,
            )
            return head_tensors({task.name: h}, "head"), {"task": task.name}

        return heads_from(self._cached(f"probe:{task.name}", key, make), "head")[task.name]

    def finetune(self, task: Task) -> tuple[dict[str, torch.Tensor], nn.Linear]:
        """``(trained encoder tensors, head)`` of ``task``'s LP-FT fine-tune."""
        probe = self.probe(task)
        key = self._key("finetune", [task])

        def make() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            trained, heads = _train(
                self.suite, [task], {task.name: probe},
                {task.name: self.prepared(task, "train")},
                steps=self.suite.config.steps, seed=self.seed,
                progress=self.progress, label=f"fine-tune {task.name}",
            )  # fmt: skip
            return {**{f"enc.{k}": v for k, v in trained.items()}, **head_tensors(heads, "head")}, {
                "task": task.name
            }

        t = self._cached(f"finetune:{task.name}", key, make)
        enc = {k[4:]: v for k, v in t.items() if k.startswith("enc.")}
        return enc, heads_from(t, "head")[task.name]

    def multitask(self, tasks: list[Task]) -> tuple[dict[str, torch.Tensor], dict[str, nn.Linear]]:
        """One encoder trained on all tasks jointly (round-robin), one head per task."""
        probes = {t.name: self.probe(t) for t in tasks}
        key = self._key("multitask", tasks)

        def make() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            trained, heads = _train(
                self.suite, tasks, probes, {t.name: self.prepared(t, "train") for t in tasks},
                steps=self.suite.config.multitask_steps, seed=self.seed,
                progress=self.progress, label="multitask",
            )  # fmt: skip
            return {**{f"enc.{k}": v for k, v in trained.items()}, **head_tensors(heads, "head")}, {
                "tasks": [t.name for t in tasks]
            }

        t = self._cached("multitask", key, make)
        return {k[4:]: v for k, v in t.items() if k.startswith("enc.")}, heads_from(t, "head")

    def is_cached(self, kind: str, tasks: list[Task]) -> bool:
        return (cache_root() / self._key(kind, tasks) / "meta.json").exists()

    def train_all(self, tasks: list[Task], *, jobs: int = 1) -> int:
        """Cache the probes, fine-tunes and multitask model of ``tasks``. With ``jobs > 1``
        the missing fine-tunes and the multitask model train in that many processes (one
        torch thread each: on a two-core machine two processes of one thread are ~2x
        faster than one, while two threads in one process were slower under any other
        load). Probes train here first: every fine-tune starts from one. Returns how many
        models were trained in worker processes (0: nothing to do, or ``jobs <= 1``, and
        the in-process path trains lazily)."""
        for t in tasks:
            self.probe(t)
        todo: list[tuple[str, list[str]]] = [
            ("finetune", [t.name]) for t in tasks if not self.is_cached("finetune", [t])
        ]
        if not self.is_cached("multitask", tasks):
            todo.insert(0, ("multitask", [t.name for t in tasks]))  # the longest first
        if jobs <= 1 or len(todo) < 2:
            return 0
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        s = self.suite
        spec = (s.name, s.quick, s.seed, [t.name for t in tasks], asdict(s.config), self.seed)
        ctx = mp.get_context("spawn")  # no fork of a process that holds torch threads
        n = min(jobs, len(todo))
        bar = self.progress(f"fine-tunes in {n} processes", len(todo)) if self.progress else None
        with bar or nullcontext() as b, ProcessPoolExecutor(n, mp_context=ctx) as pool:
            futures = [pool.submit(_train_job, spec, kind, names) for kind, names in todo]
            for f in as_completed(futures):
                f.result()  # re-raises a worker's error here
                if b is not None:
                    b.advance()
        return len(todo)


_WORKER_SUITES: dict[Any, Suite] = {}


def _train_job(spec: tuple[Any, ...], kind: str, names: list[str]) -> str:
    """Worker process: rebuild the suite from ``spec`` and train one model into the cache."""
    from .suites import TrainConfig, make_suite

    torch.set_num_threads(1)
    name, quick, seed, task_names, config, train_seed = spec
    key = (name, quick, seed, tuple(task_names), json.dumps(config, sort_keys=True))
    if key not in _WORKER_SUITES:
        suite = make_suite(name, quick=quick, seed=seed, tasks=task_names)
        suite.config = TrainConfig(**config)
        _WORKER_SUITES[key] = suite
    trainer = Trainer(_WORKER_SUITES[key], seed=train_seed)
    tasks = [trainer.suite.task(n) for n in names]
    if kind == "multitask":
        trainer.multitask(tasks)
    else:
        trainer.finetune(tasks[0])
    return trainer.keys[f"{kind}:{names[0]}" if kind == "finetune" else "multitask"]


def pretrain_digits(suite: Any) -> dict[str, torch.Tensor]:
    """The digits suite's base: an MLP trained (seeded, cached) on digit >= 5 vs < 5."""
    from .suites import MLPEncoder

    steps = 60 if suite.quick else suite.pretrain_steps
    key = cache_key(kind="digits-base", seed=suite.seed, steps=steps)
    hit = load_cached(key)
    if hit is not None:
        return hit[0]
    x, y = suite.pretrain_data()
    torch.manual_seed(suite.seed)
    gen = torch.Generator().manual_seed(suite.seed)
    enc, head = MLPEncoder(), nn.Linear(128, 2)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=1e-3)
    sampler = _sampler(len(y), 64, gen)
    for _ in range(steps):
        idx = next(sampler)
        loss = nn.functional.cross_entropy(head(enc(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    save_cached(key, state, {"kind": "digits-base", "steps": steps})
    return state


@functools.cache
def source_hash(*packages: str) -> str:
    """Hash of the ``.py`` sources of brickwork subpackages (e.g. ``merge``): a cached
    result computed by other code is never reused. Computed once per process, so one run's
    rows all carry the same hash even when the sources are edited while it runs."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def load_row(key: str) -> dict[str, Any] | None:
    p = cache_root() / "rows" / f"{key}.json"
    return json.loads(p.read_text()) if p.exists() else None


def save_row(key: str, row: dict[str, Any]) -> None:
    d = cache_root() / "rows"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{key}.tmp"
    tmp.write_text(json.dumps(row, default=str))
    os.replace(tmp, d / f"{key}.json")
