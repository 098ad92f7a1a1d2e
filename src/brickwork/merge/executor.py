"""The streaming executor: for each job read → compute → hand to a sink → free.

Peak memory is a few tensors × the number of inputs, whatever the model size: inputs are
read one tensor at a time, each output tensor goes straight to the writer, nothing is
accumulated. The next job's inputs are read (and converted to the compute dtype) on a
second thread while the current one computes; file reads and torch ops release the GIL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol

import torch

from ..checkpoint.reader import Checkpoint
from ..errors import BrickworkError, MergeComputationError
from .plan import Job, Plan, resolve_parameters


class Sink(Protocol):
    def write(self, name: str, tensor: torch.Tensor) -> None: ...


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: results do not depend on the order tensors are processed in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


Loaded = tuple[list[torch.Tensor], torch.Tensor | None]


def load_inputs(job: Job, ckpts: dict[str, Checkpoint], *, compute_dtype: torch.dtype) -> Loaded:
    """Read a job's input tensors (and base) in the compute dtype; copies are read as they are."""
    if job.copy is not None:
        return [ckpts[job.copy.model].get(job.copy.name)], None
    tensors = [ckpts[s.model].get(s.name).to(compute_dtype) for s in job.inputs]
    base = None
    if job.base is not None:
        base = ckpts[job.base.model].get(job.base.name).to(compute_dtype)
    return tensors, base


def run_job(
    plan: Plan,
    job: Job,
    ckpts: dict[str, Checkpoint],
    *,
    seed: int,
    compute_dtype: torch.dtype,
    loaded: Loaded | None = None,
) -> torch.Tensor:
    tensors, base = loaded or load_inputs(job, ckpts, compute_dtype=compute_dtype)
    if job.copy is not None:
        return tensors[0]
    method = plan.method
    kwargs = resolve_parameters(method, job)
    if base is not None:
        kwargs["base"] = base
    if method.seeded:
        kwargs["generator"] = torch.Generator().manual_seed(tensor_seed(seed, job.info.name))
    try:
        out = method.func(tensors, **kwargs)
    except BrickworkError as e:
        raise type(e)(f"tensor '{job.info.name}': {e}") from None
    except (RuntimeError, ValueError) as e:
        raise MergeComputationError(
            f"method '{method.name}' failed on tensor '{job.info.name}': {e}"
        ) from e
    if tuple(out.shape) != job.info.shape:
        raise MergeComputationError(
            f"method '{method.name}' returned shape {tuple(out.shape)} for tensor '{job.info.name}', expected {job.info.shape}."
        )
    return out


def execute(
    plan: Plan,
    ckpts: dict[str, Checkpoint],
    sink: Sink,
    *,
    seed: int = 0,
    compute_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    on_tensor: Callable[[Job], None] | None = None,
) -> None:
    from tqdm.auto import tqdm

    total = sum(j.info.nbytes for j in plan.jobs)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"merge ({plan.method.name})",
        disable=not progress,
        delay=1.0,
        leave=False,
    )
    # no_grad, not inference_mode: outputs handed to an in-memory sink must stay ordinary
    # tensors that callers may edit in place or use with autograd.
    from concurrent.futures import ThreadPoolExecutor

    def load(job: Job) -> Loaded:
        with torch.no_grad():
            return load_inputs(job, ckpts, compute_dtype=compute_dtype)

    with torch.no_grad(), bar, ThreadPoolExecutor(max_workers=1) as pool:
        jobs = plan.jobs
        pending = pool.submit(load, jobs[0]) if jobs else None
        for i, job in enumerate(jobs):
            loaded = pending.result()
            pending = pool.submit(load, jobs[i + 1]) if i + 1 < len(jobs) else None
            out = run_job(plan, job, ckpts, seed=seed, compute_dtype=compute_dtype, loaded=loaded)
            del loaded
            sink.write(job.info.name, out.to(job.info.dtype))
            del out
            if on_tensor is not None:
                on_tensor(job)
            bar.update(job.info.nbytes)
