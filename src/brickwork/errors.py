"""Every user-facing failure is a :class:`BrickworkError` subclass.

Messages name the file / tensor / field, what was found, what was expected and
what to do. The CLI prints them without a traceback and exits non-zero.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BrickworkError(Exception):
    """Base class of every error brickwork raises for a user's mistake or bad input."""

    exit_code = 2


class RecipeError(BrickworkError):
    """A recipe (YAML or Python) is invalid: unknown key, bad value, missing field."""


class UnknownNameError(RecipeError):
    """A name (method, suite, task, ...) is not registered."""


class CheckpointError(BrickworkError):
    """A checkpoint cannot be read: missing, unreadable, truncated, corrupt or unsafe."""


class IncompatibleModelsError(BrickworkError):
    """Input models cannot be combined: names, shapes or dtypes disagree."""


class OutputExistsError(BrickworkError):
    """The output path exists and ``force`` was not given."""


class OutOfSpaceError(BrickworkError):
    """The output's file system has (or had) too little free space for the output."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived while a model was being written (SIGINT stays a
    ``KeyboardInterrupt``).

    Not a :class:`BrickworkError` (code that handles user errors must not swallow it) and not
    a ``KeyboardInterrupt`` (typer would turn it into exit 130); the CLI exits with
    128 + the signal number."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class MergeComputationError(BrickworkError):
    """A merge method could not compute a tensor (e.g. degenerate input)."""


class DataError(BrickworkError):
    """Calibration data is missing, does not fit the model (tokenizer, vocabulary, input
    names or shapes), or holds too few examples for the statistics a method needs."""


class RegularizedWarning(UserWarning):
    """A linear system of a data-aware merge was singular and was solved with a small ridge
    added to its diagonal; the output's provenance records where and how much."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return `` Did you mean 'x'?`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UnknownNameError:
    known = sorted(known)
    return UnknownNameError(
        f"Unknown {kind} '{name}'. Known: {', '.join(known)}.{did_you_mean(name, known)}"
    )


class AlignError(BrickworkError):
    """A model cannot be aligned: its permutation spec cannot be derived (a module or
    operation that does not commute with a permutation of its hidden units), or the two
    models' specs disagree."""
