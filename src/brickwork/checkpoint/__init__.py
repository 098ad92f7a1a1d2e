"""Checkpoint readers (lazy) and the atomic sharded writer."""

from .reader import Checkpoint, StateDictCheckpoint, TensorInfo, open_checkpoint
from .writer import CheckpointWriter, parse_size

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "StateDictCheckpoint",
    "TensorInfo",
    "open_checkpoint",
    "parse_size",
]
