"""Built-in merge methods; importing this package registers them."""

from . import (  # noqa: F401
    breadcrumbs,
    dare,
    della,
    iso,
    karcher,
    linear,
    model_stock,
    passthrough,
    pcb,
    slerp,
    task_arithmetic,
    ties,
    tsv_m,
    wudi,
)
