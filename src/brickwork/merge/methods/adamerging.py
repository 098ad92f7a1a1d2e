"""AdaMerging, registered as a module-level method; its implementation is
:func:`brickwork.merge.adamerging.adamerging`, imported the first time it is used (Yang et
al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024,
arXiv:2310.02575)."""

from __future__ import annotations

from ..registry import register_lazy_method

register_lazy_method(
    "adamerging",
    "brickwork.merge.adamerging:adamerging",
    base="required",
    description="Task- or layer-wise task-arithmetic coefficients learned by entropy "
    "minimisation on unlabelled inputs of every task (module level: models and data).",
    reference="Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task "
    "Learning, arXiv:2310.02575",
)
