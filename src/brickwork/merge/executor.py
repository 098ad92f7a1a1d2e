"""The streaming executor: for each job read → compute → hand to a sink → free.

Peak memory is a few tensors × the number of inputs, whatever the model size: inputs are
read one tensor at a time, each output tensor goes straight to the writer, nothing is
accumulated. The next job's inputs are read (and moved to the compute device and dtype) on
a second thread while the current one computes; file reads and torch ops release the GIL.
With ``device="cuda"`` inputs are read on the CPU, moved to the GPU, computed there, and
the output comes back to the CPU (in its output dtype) for the sink.
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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (cuda when available, else cpu) as a device;
    cuda without a usable GPU is an error that says what to do."""
    name = "cpu" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BrickworkError(
            f"--device / device={name!r} is not a device; use cpu, cuda, cuda:N or auto."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BrickworkError(
            f"--device / device={name!r}: no CUDA GPU is available to torch "
            f"{torch.__version__} (torch.cuda.is_available() is False). Use --device cpu "
            "(the default) or auto, or install a CUDA build of torch on a machine with a GPU."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BrickworkError(
            f"--device / device={name!r}: only {torch.cuda.device_count()} CUDA device(s) "
            "are visible; use cuda:0 ... or auto."
        )
    if dev.type not in ("cpu", "cuda"):
        raise BrickworkError(f"--device / device={name!r}: use cpu, cuda, cuda:N or auto.")
    return dev


def load_inputs(
    job: Job,
    ckpts: dict[str, Checkpoint],
    *,
    compute_dtype: torch.dtype | None,
    device: torch.device | None = None,
) -> Loaded:
    """Read a job's input tensors (and base) on the CPU and move them to ``device`` in the
    compute dtype (``None``: the inputs' own dtype, promoted across them, as mergekit without
    ``dtype:``). Copies are read as they are and stay on the CPU. A tensor already in the
    compute dtype on the right device is used as read, without a copy."""
    if job.copy is not None:
        return [ckpts[job.copy.model].get(job.copy.name)], None
    raw = [ckpts[s.model].get(s.name) for s in job.inputs]
    base = ckpts[job.base.model].get(job.base.name) if job.base is not None else None
    dtype = compute_dtype
    if dtype is None:
        dtype = raw[0].dtype
        for t in [*raw[1:], *([base] if base is not None else [])]:
            dtype = torch.promote_types(dtype, t.dtype)

    def move(t: torch.Tensor) -> torch.Tensor:  # to the device first: a smaller transfer
        return t.to(device).to(dtype) if device is not None else t.to(dtype)

    return [move(t) for t in raw], (move(base) if base is not None else None)


def run_job(
    plan: Plan,
    job: Job,
    ckpts: dict[str, Checkpoint],
    *,
    seed: int,
    compute_dtype: torch.dtype | None,
    device: torch.device | None = None,
    loaded: Loaded | None = None,
) -> torch.Tensor:
    tensors, base = loaded or load_inputs(job, ckpts, compute_dtype=compute_dtype, device=device)
    if job.copy is not None:
        return tensors[0]
    method = plan.method
    kwargs = resolve_parameters(method, job)
    if base is not None:
        kwargs["base"] = base
    if method.seeded:  # a CPU generator on every device: the same random draws everywhere
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
    compute_dtype: torch.dtype | None = torch.float32,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_tensor: Callable[[Job], None] | None = None,
) -> None:
    """Run every job of ``plan``, handing each output (on the CPU) to ``sink``.

    ``compute_dtype``: the dtype the methods receive (``None``: each tensor's own, promoted);
    ``device``: cpu (default), cuda, cuda:N or auto (see :func:`resolve_device`).
    """
    from tqdm.auto import tqdm

    dev = resolve_device(device)
    to_dev = None if dev.type == "cpu" else dev

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
            return load_inputs(job, ckpts, compute_dtype=compute_dtype, device=to_dev)

    with torch.no_grad(), bar, ThreadPoolExecutor(max_workers=1) as pool:
        jobs = plan.jobs
        pending = pool.submit(load, jobs[0]) if jobs else None
        for i, job in enumerate(jobs):
            loaded = pending.result()
            pending = pool.submit(load, jobs[i + 1]) if i + 1 < len(jobs) else None
            out = run_job(
                plan,
                job,
                ckpts,
                seed=seed,
                compute_dtype=compute_dtype,
                device=to_dev,
                loaded=loaded,
            )
            del loaded
            sink.write(job.info.name, out.to(job.info.dtype).cpu())
            del out
            if on_tensor is not None:
                on_tensor(job)
            bar.update(job.info.nbytes)
