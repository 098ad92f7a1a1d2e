"""route: mixture-of-experts layers, upcycling dense fine-tunes into MoE checkpoints."""

from __future__ import annotations

from .moe import FFN, MoELayer, MoEOutput, load_balancing_loss
from .upcycle import upcycle_to_mixtral

__all__ = ["FFN", "MoELayer", "MoEOutput", "load_balancing_loss", "upcycle_to_mixtral"]
