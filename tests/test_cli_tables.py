"""``brickwork inspect`` and ``brickwork methods`` fit an 80-column terminal without
cutting a tensor name; wider terminals show more columns."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from brickwork.inspect import inspect_one, inspect_two
from brickwork.merge.registry import get_method, list_methods


def _llama_names(layers: int = 12) -> dict[str, tuple[int, ...]]:
    """Tensor names and (small) shapes laid out as a Llama / Mixtral checkpoint."""
    shapes = {"model.embed_tokens.weight": (320, 16), "model.norm.weight": (16,),
              "lm_head.weight": (320, 16)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj, shape in [("q", (16, 16)), ("k", (8, 16)), ("v", (8, 16)), ("o", (16, 16))]:
            shapes[f"{p}self_attn.{proj}_proj.weight"] = shape
        shapes[f"{p}input_layernorm.weight"] = (16,)
        shapes[f"{p}post_attention_layernorm.weight"] = (16,)
        shapes[f"{p}block_sparse_moe.gate.weight"] = (4, 16)
        for e in range(4):
            shapes[f"{p}block_sparse_moe.experts.{e}.w1.weight"] = (48, 16)
    return shapes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path, dict[str, tuple[int, ...]]]:
    d = tmp_path_factory.mktemp("tables")
    shapes = _llama_names()
    g = torch.Generator().manual_seed(0)
    a = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    a["model.embed_tokens.weight"] = a["model.embed_tokens.weight"].to(torch.bfloat16)
    b = {n: t + 0.01 * torch.randn(t.shape, generator=g).to(t.dtype) for n, t in a.items()}
    save_file(a, d / "a.safetensors")
    save_file(b, d / "b.safetensors")
    return d / "a.safetensors", d / "b.safetensors", shapes


def _render(fn, *args, width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), record=True)
    fn(*args, console=console)
    return console.export_text().splitlines()


def _names_verbatim(lines: list[str], names) -> None:
    text = "\n".join(lines)
    assert "…" not in text
    for n in names:  # the whole name, delimited, on one line
        assert re.search(rf"(^|\s){re.escape(n)}(\s|$)", text, re.M), n


@pytest.mark.parametrize("width", [80, 60])
def test_inspect_one_fits_and_never_cuts_a_name(checkpoints, width):
    a, _, shapes = checkpoints
    lines = _render(inspect_one, a, width=width)
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    _names_verbatim(lines, shapes)
    assert "model.layers.10.self_attn.q_proj.weight" in shapes
    text = " ".join(" ".join(lines).split())  # the summary may wrap at a space
    assert f"{sum(torch.Size(s).numel() for s in shapes.values()):,} parameters" in text
    assert "dtypes: bfloat16, float32" in text


def test_inspect_one_columns_compact_then_full_as_width_allows(checkpoints):
    a, _, _ = checkpoints
    name = "model.layers.10.block_sparse_moe.experts.3.w1.weight"
    row80 = next(line for line in _render(inspect_one, a, width=80) if line.startswith(name))
    assert row80.split()[1:] == ["48×16", "f32", "768"]  # compact: fits beside the name
    row120 = next(line for line in _render(inspect_one, a, width=120) if line.startswith(name))
    assert row120.split()[1:] == ["[48,", "16]", "float32", "768"]


def test_inspect_two_fits_80_and_shows_more_when_wider(checkpoints):
    a, b, shapes = checkpoints
    lines = _render(inspect_two, a, b, width=80)
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    _names_verbatim(lines, shapes)
    head = next(line for line in lines if line.startswith("tensor"))
    assert "relative" in head and "cosine" in head  # the two columns kept first
    assert any(line.startswith("not shown at 80 columns:") for line in lines)
    wide = _render(inspect_two, a, b, width=160)
    head160 = next(line for line in wide if line.startswith("tensor"))
    assert all(c in head160 for c in ["shape", "‖a‖", "‖b − a‖", "max |b − a|"])
    assert not any("not shown" in line for line in wide)
    _names_verbatim(wide, shapes)


def test_names_wider_than_the_terminal_are_printed_whole(tmp_path):
    long = "model.vision_tower.encoder.layers.26.self_attn.out_proj.weight_scale_inv." + "x" * 30
    tensors = {long: torch.ones(3), "model.embed_tokens.weight": torch.ones(4, 2)}
    save_file(tensors, tmp_path / "a.safetensors")
    save_file({k: 2 * v for k, v in tensors.items()}, tmp_path / "b.safetensors")
    for lines in (
        _render(inspect_one, tmp_path / "a.safetensors", width=80),
        _render(inspect_two, tmp_path / "a.safetensors", tmp_path / "b.safetensors", width=80),
    ):
        _names_verbatim(lines, tensors)  # folded: each name on a line of its own
        assert [line for line in lines if len(line) > 80] == [long]
        assert lines[lines.index(long) + 1].startswith("    ")  # its values below it


def test_inspect_cli_at_80_columns(run_cli, llama_family, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli("inspect", llama_family.ft1)
    assert code == 0, err
    assert all(len(line) <= 80 for line in out.splitlines())
    assert "…" not in out and "model.layers.0.self_attn.q_proj.weight" in out
    code, out, err = run_cli("inspect", llama_family.ft1, llama_family.ft2)
    assert code == 0, err
    assert all(len(line) <= 80 for line in out.splitlines()) and "…" not in out


def test_methods_fits_80_columns(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli("methods")
    assert code == 0, err
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "…" not in out
    starts = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    for name in list_methods():
        assert name in starts, name  # each method's row starts with its name
    flat = " ".join(out.split())
    for name in list_methods():  # parameters and reference, wrapped at spaces
        assert " ".join(get_method(name).reference.split()) in flat


def test_methods_wide_is_one_line_per_method(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli("methods", "--wide")
    assert code == 0, err
    for name in list_methods():
        m = get_method(name)
        row = [line for line in out.splitlines() if line.startswith(name + " ")]
        assert len(row) == 1 and m.reference in row[0], name
