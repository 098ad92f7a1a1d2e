"""Built-in merge methods; importing this package registers them."""

from . import (  # noqa: F401
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_stock,
    passthrough,
    slerp,
    task_arithmetic,
    ties,
)
