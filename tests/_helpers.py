"""Plain helpers shared by test files (import as ``from _helpers import ...``)."""

from __future__ import annotations

from pathlib import Path


def write_yaml(path: Path, data: dict | str) -> Path:
    import yaml

    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def leftovers(out: Path) -> list[str]:
    """Anything brickwork may have left next to ``out``: the output itself or temp dirs."""
    parent = out.parent
    if not parent.exists():
        return []
    return sorted(
        p.name for p in parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")
    )
