"""The writer's staging directory: who owns it, stale ones left by dead runs, signals.

Every model brickwork writes is assembled in ``.<name>.tmp-XXXX`` beside the output and
renamed onto it when complete. This module makes that safe against the three ways a run
can end early:

* an exception: the writer removes the directory (``CheckpointWriter.__exit__``);
* SIGINT / SIGTERM / SIGHUP: :class:`SignalGuard` turns them into ``KeyboardInterrupt`` /
  :class:`Interrupted` in the main thread, so the same ``__exit__`` removes the directory;
* SIGKILL or power loss: nothing can run, so every staging directory records its owner
  (pid, host, boot id, process start time) in :data:`OWNER_FILE`; the next run that writes
  the same output removes those whose owner is dead (:func:`remove_stale`) and never
  touches one whose owner still runs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import Interrupted

OWNER_FILE = ".brickwork-owner.json"
_SIGNALS = tuple(
    s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None
)


def staging_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def old_prefix(out: Path) -> str:
    return f".{out.name}.old-"


# -- owner records ----------------------------------------------------------------------------
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22).

    Together with the pid it names one process: a recycled pid has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may contain spaces
    return int(stat.rsplit(")", 1)[1].split()[19])


def owner_record() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "start_ticks": _start_ticks(pid),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def owner_state(record: dict[str, Any]) -> str:
    """``"dead"``, ``"alive"`` or ``"unknown"`` (another host: brickwork cannot tell)."""
    if record.get("host") != socket.gethostname():
        return "unknown"
    boot = _boot_id()
    if record.get("boot_id") and boot and record["boot_id"] != boot:
        return "dead"  # the machine rebooted since (power loss)
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not _pid_alive(pid):  # never kill(-1, 0)
        return "dead"
    ticks = record.get("start_ticks")
    if ticks is not None and _start_ticks(pid) not in (None, ticks):
        return "dead"  # the pid was recycled by another process
    return "alive"


def read_owner(directory: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((directory / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# -- stale staging directories ------------------------------------------------------------------
def remove_stale(out: Path, say: Callable[[str], None]) -> None:
    """Remove the staging directories of dead runs that wrote ``out``; one line each.

    A replaced output (``.<name>.old-XXXX``, renamed away by a ``--force`` run that then
    died before its new output took its place) is put back when ``out`` is missing, so a
    kill never loses the model that was there before."""
    parent = out.parent
    if not parent.is_dir():
        return
    for d in sorted(parent.glob(staging_prefix(out) + "*")):
        if not d.is_dir():
            continue
        record = read_owner(d)
        if record is None:
            say(
                f"note: {d} ({human(tree_size(d))}) has no owner record; it may be left by an "
                "older brickwork. Remove it by hand if no brickwork run is writing "
                f"{out.name}."
            )
            continue
        state = owner_state(record)
        if state == "alive":
            continue
        if state == "unknown":
            say(
                f"note: {d} belongs to a run on host {record.get('host')}; left alone "
                "(brickwork cannot tell from here whether it still runs)."
            )
            continue
        size = tree_size(d)
        shutil.rmtree(d, ignore_errors=True)
        say(
            f"removed {d} ({human(size)}), left by an interrupted run "
            f"(pid {record.get('pid')}, started {record.get('started')})"
        )
    for d in sorted(parent.glob(old_prefix(out) + "*")):
        tag = d.name.removeprefix(old_prefix(out))
        if (parent / (staging_prefix(out) + tag)).exists():
            continue  # its run is still alive (its staging directory was kept above)
        if out.exists():
            shutil.rmtree(d, ignore_errors=True)
            say(f"removed {d}, the previous {out.name} that an interrupted --force run replaced")
        else:
            d.rename(out)
            say(f"restored {out} from {d}: an interrupted --force run had moved it away")


# -- signals ------------------------------------------------------------------------------------
def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)


def signal_name(exc: BaseException) -> str:
    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name


class SignalGuard:
    """While active (main thread only), SIGTERM/SIGHUP raise :class:`Interrupted` and SIGINT
    raises ``KeyboardInterrupt``.

    Only signals whose handler is Python's default are taken over (a program that set its
    own handler keeps it). :meth:`hold` defers signals while the writer finishes or cleans
    up, so neither the final rename nor the removal is cut in half; a deferred signal is
    raised when the hold ends."""

    def __init__(self) -> None:
        self._old: dict[int, Any] = {}
        self._held = False
        self._pending: int | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self._held:
            self._pending = signum
            return
        raise _exception(signum)

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in _SIGNALS:
            current = signal.getsignal(s)
            if current in (signal.SIG_DFL, signal.default_int_handler):
                self._old[s] = current
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self._held = True
        try:
            yield
        finally:
            self._held = False

    def raise_pending(self) -> None:
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise _exception(signum)
