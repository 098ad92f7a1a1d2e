"""Built-in merge methods; importing this package registers them."""

from . import (  # noqa: F401
    adamerging,
    breadcrumbs,
    dare,
    della,
    fisher,
    iso,
    karcher,
    linear,
    model_stock,
    passthrough,
    pcb,
    regmean,
    regmean_plusplus,
    slerp,
    task_arithmetic,
    ties,
    tsv_m,
    wudi,
)
