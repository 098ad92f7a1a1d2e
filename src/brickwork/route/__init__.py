"""route: mixture-of-experts layers, upcycling dense fine-tunes into MoE checkpoints."""

from __future__ import annotations

from .moe import FFN, MoELayer, MoEOutput, load_balancing_loss

__all__ = ["FFN", "MoELayer", "MoEOutput", "load_balancing_loss"]
