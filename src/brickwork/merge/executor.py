"""The streaming executor: for each job read → compute → hand to a sink → free.

Peak memory is a few tensors × the number of inputs, whatever the model size: inputs are
read one tensor at a time, each output tensor goes straight to the writer, nothing is
accumulated. The next job's inputs are read (and moved to the compute device and dtype) on
a second thread while the current one computes; file reads and torch ops release the GIL.
With ``device="cuda"`` inputs are read on the CPU, moved to the GPU, computed there, and
the output comes back to the CPU (in its output dtype) for the sink.

A data-aware method (``statistics=`` in the registry) also receives, per input model, that
model's statistics of the tensor being merged, read from the statistics cache one tensor at
a time (``statistics=`` of :func:`execute`): memory holds one tensor's statistics, never all
of them. What the method warns about (a ridge added to a singular system) is recorded in
``statistics.notes`` for the output's provenance and shown once as a one-line warning.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..checkpoint.reader import Checkpoint
from ..errors import BrickworkError, DataError, MergeComputationError, RegularizedWarning
from .plan import Job, Plan, Source, resolve_parameters


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


class BufferPool:
    """Byte buffers for input tensors, handed back after their job and reused by a later job
    of the same size, so that reading and converting inputs write into pages that are already
    resident instead of faulting in fresh ones, 4 KiB at a time (page faults were a large
    share of a merge's time: as much system time as the arithmetic took user time). At most
    ``max_bytes`` of free buffers are kept, the least recently returned dropped first.
    Thread-safe: the prefetch thread takes, the main thread gives back."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: OrderedDict[int, torch.Tensor] = OrderedDict()  # id -> uint8 buffer
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            for key, buf in self._free.items():
                if buf.numel() == nbytes:
                    del self._free[key]
                    self._bytes -= nbytes
                    return buf
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free[id(buf)] = buf
            self._bytes += buf.numel()
            while self._bytes > self.max_bytes:
                _, old = self._free.popitem(last=False)
                self._bytes -= old.numel()


def _compute_dtype_of(
    job: Job, ckpts: dict[str, Checkpoint], dtype: torch.dtype | None
) -> torch.dtype:
    """``dtype``, or (``None``) the promoted dtype of the job's inputs as stored."""
    if dtype is not None:
        return dtype
    sources = [*job.inputs, *([job.base] if job.base is not None else [])]
    out = ckpts[sources[0].model].info(sources[0].name).dtype
    for s in sources[1:]:
        out = torch.promote_types(out, ckpts[s.model].info(s.name).dtype)
    return out


def load_inputs(
    job: Job,
    ckpts: dict[str, Checkpoint],
    *,
    compute_dtype: torch.dtype | None,
    device: torch.device | None = None,
    pool: BufferPool | None = None,
    used: list[torch.Tensor] | None = None,
) -> Loaded:
    """Read a job's input tensors (and base) on the CPU and move them to ``device`` in the
    compute dtype (``None``: the inputs' own dtype, promoted across them, as mergekit without
    ``dtype:``). Copies are read as they are and stay on the CPU.

    With a ``pool``, CPU inputs are read (and converted) into its buffers, which are appended
    to ``used`` for the caller to give back once the job's output is written; inputs bound
    for another device are read into one scratch buffer of the pool before being moved.
    In-memory checkpoints hand over their own tensors (never modified), converted if needed.
    """
    if job.copy is not None:
        return [ckpts[job.copy.model].get(job.copy.name)], None
    dtype = _compute_dtype_of(job, ckpts, compute_dtype)
    used = [] if used is None else used

    def read(s: Source) -> torch.Tensor:
        ck = ckpts[s.model]
        info = ck.info(s.name)
        if pool is None:
            t = ck.get(s.name)
            return t.to(device).to(dtype) if device is not None else t.to(dtype)
        raw_buf = pool.take(info.nbytes)
        raw = ck.get(s.name, buffer=raw_buf)
        in_buf = raw.untyped_storage().data_ptr() == raw_buf.data_ptr()
        if device is not None:  # to the device first (a smaller transfer), then convert
            out = raw.to(device).to(dtype)
        elif raw.dtype == dtype:
            out = raw  # as read: in the pool's buffer, or the in-memory checkpoint's tensor
            if in_buf:
                used.append(raw_buf)
                return out
        else:
            conv = pool.take(info.numel * dtype.itemsize)
            out = conv.view(dtype).reshape(info.shape).copy_(raw)  # (shape,) converted
            used.append(conv)
        pool.give(raw_buf)  # read into, converted or moved out of: free again
        return out

    loaded = [read(s) for s in [*job.inputs, *([job.base] if job.base is not None else [])]]
    return (loaded[:-1], loaded[-1]) if job.base is not None else (loaded, None)


def _input_bytes(job: Job, ckpts: dict[str, Checkpoint], dtype: torch.dtype | None) -> int:
    """Bytes of a job's inputs as read plus as converted to the compute dtype."""
    if job.copy is not None:
        return 0
    dtype = _compute_dtype_of(job, ckpts, dtype)
    infos = [ckpts[s.model].info(s.name) for s in [*job.inputs, *([job.base] if job.base else [])]]
    return sum(i.nbytes + (i.numel * dtype.itemsize if i.dtype != dtype else 0) for i in infos)


def run_job(
    plan: Plan,
    job: Job,
    ckpts: dict[str, Checkpoint],
    *,
    seed: int,
    compute_dtype: torch.dtype | None,
    device: torch.device | None = None,
    loaded: Loaded | None = None,
    statistics: Any = None,
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
    if method.statistics:
        kwargs["statistics"] = _tensor_statistics(method, job, statistics, tensors[0].device)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RegularizedWarning)
            out = method.func(tensors, **kwargs)
        for w in caught:
            if issubclass(w.category, RegularizedWarning) and statistics is not None:
                statistics.notes.append({"tensor": job.info.name, "note": str(w.message)})
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
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


def _tensor_statistics(method: Any, job: Job, statistics: Any, device: torch.device) -> list[Any]:
    """Per input model, its statistics of this job's tensor (``None`` where it has none),
    on the compute device."""
    if statistics is None:
        raise DataError(
            f"method '{method.name}' needs statistics ({', '.join(method.statistics)}) of "
            "every model, computed on calibration data, and none were given: add a 'data:' "
            "block to every model of the recipe, or call merge_modules(..., data=[...])."
        )
    out = []
    for s in job.inputs:
        st = statistics.for_tensor(s.model, s.name)
        if st is not None and device.type != "cpu":
            from dataclasses import replace

            st = replace(
                st,
                gram=None if st.gram is None else st.gram.to(device),
                fisher=None if st.fisher is None else st.fisher.to(device),
            )
        out.append(st)
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
    statistics: Any = None,
) -> None:
    """Run every job of ``plan``, handing each output (on the CPU) to ``sink``.

    ``compute_dtype``: the dtype the methods receive (``None``: each tensor's own, promoted);
    ``device``: cpu (default), cuda, cuda:N or auto (see :func:`resolve_device`);
    ``statistics``: a :class:`brickwork.stats.store.StatisticsSource` for data-aware methods.
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

    # room for two jobs' inputs (the one computing and the one being read), read and converted
    biggest = max((_input_bytes(j, ckpts, compute_dtype) for j in plan.jobs), default=0)
    pool = BufferPool(max_bytes=2 * biggest)

    def load(job: Job) -> tuple[Loaded, list[torch.Tensor]]:
        used: list[torch.Tensor] = []
        with torch.no_grad():
            loaded = load_inputs(
                job, ckpts, compute_dtype=compute_dtype, device=to_dev, pool=pool, used=used
            )
        return loaded, used

    with torch.no_grad(), bar, ThreadPoolExecutor(max_workers=1) as threads:
        jobs = plan.jobs
        pending = threads.submit(load, jobs[0]) if jobs else None
        for i, job in enumerate(jobs):
            loaded, used = pending.result()
            pending = threads.submit(load, jobs[i + 1]) if i + 1 < len(jobs) else None
            out = run_job(
                plan,
                job,
                ckpts,
                seed=seed,
                compute_dtype=compute_dtype,
                device=to_dev,
                loaded=loaded,
                statistics=statistics,
            )
            del loaded
            written = out.to(job.info.dtype).cpu()
            del out
            sink.write(job.info.name, written)
            kept = written.untyped_storage().data_ptr()  # the sink may hold on to it
            for buf in used:
                if buf.data_ptr() != kept:
                    pool.give(buf)
            del written, used
            if on_tensor is not None:
                on_tensor(job)
            bar.update(job.info.nbytes)
    if statistics is not None and statistics.notes:
        n = len(statistics.notes)
        warnings.warn(
            f"{plan.method.name}: {n} singular system(s) solved with a small ridge added "
            f"(first: tensor '{statistics.notes[0]['tensor']}': {statistics.notes[0]['note']}); "
            "recorded in the output's provenance.",
            RegularizedWarning,
            stacklevel=2,
        )
