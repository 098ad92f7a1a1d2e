"""Parameter types shared by several methods (pydantic constraints checked at recipe time)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from ..registry import PerModel

Weight = PerModel[float]
Density = PerModel[Annotated[float, Field(gt=0, le=1)]]
Fraction = Annotated[float, Field(ge=0, le=1)]
Lambda = Annotated[float, Field(allow_inf_nan=False)]
