"""CheckpointWriter.copy: chunked pass-through copy of unchanged tensors (issue 12)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from brickwork.checkpoint.reader import SafetensorsCheckpoint, TensorInfo, open_checkpoint
from brickwork.checkpoint.writer import CheckpointWriter
from brickwork.errors import BrickworkError, CheckpointError


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(37, 11, generator=g),  # 1628 bytes: several 100-byte chunks
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "ids": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
        "c.weight": torch.randn(9, 13, generator=g).to(torch.float16),
    }


def _digests(d: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.iterdir())
        if p.name != "brickwork.json"
    }


def _source(tmp_path: Path, sd: dict[str, torch.Tensor]) -> SafetensorsCheckpoint:
    # stored in another order than the plan's, so offsets are not those of the output
    f = tmp_path / "src.safetensors"
    save_file(dict(reversed(list(sd.items()))), f)
    ck = open_checkpoint(f)
    assert isinstance(ck, SafetensorsCheckpoint)
    return ck


@pytest.mark.parametrize("shard_size", ["5GB", 1700, 300])
def test_copy_is_byte_identical_to_write(tmp_path, shard_size):
    sd = _sd()
    ck = _source(tmp_path, sd)
    infos = [ck.info(n) for n in sd]
    with CheckpointWriter(tmp_path / "w", infos, shard_size=shard_size) as w:
        for n, t in sd.items():
            w.write(n, t)
    with CheckpointWriter(tmp_path / "c", infos, shard_size=shard_size) as w:
        for n in sd:
            w.copy(n, ck, chunk_bytes=100)
    assert _digests(tmp_path / "c") == _digests(tmp_path / "w")
    if shard_size != "5GB":
        assert len([p for p in (tmp_path / "c").iterdir() if p.suffix == ".safetensors"]) > 1
    out = open_checkpoint(tmp_path / "c")
    for n, t in sd.items():
        assert torch.equal(out.get(n), t), n


def test_copy_reads_in_chunks_without_building_the_tensor(tmp_path, monkeypatch):
    sd = _sd()
    ck = _source(tmp_path, sd)
    sizes: list[int] = []
    orig = SafetensorsCheckpoint.iter_raw

    def spy(self, name, *, chunk_bytes):
        for piece in orig(self, name, chunk_bytes=chunk_bytes):
            sizes.append(len(piece))
            yield piece

    def no_get(*a, **k):
        raise AssertionError("copy built the tensor")

    monkeypatch.setattr(SafetensorsCheckpoint, "iter_raw", spy)
    monkeypatch.setattr(SafetensorsCheckpoint, "get", no_get)
    infos = [ck.info("a.weight")]
    with CheckpointWriter(tmp_path / "c", infos) as w:
        w.copy("a.weight", ck, chunk_bytes=100)
    assert max(sizes) == 100 and sum(sizes) == 37 * 11 * 4 and len(sizes) == 17


def test_copy_under_another_name(tmp_path):
    sd = _sd()
    ck = _source(tmp_path, sd)
    infos = [TensorInfo("renamed", (37, 11), torch.float32)]
    with CheckpointWriter(tmp_path / "c", infos) as w:
        w.copy("renamed", ck, source="a.weight")
    assert torch.equal(open_checkpoint(tmp_path / "c").get("renamed"), sd["a.weight"])


def test_copy_falls_back_to_write(tmp_path):
    sd = _sd()
    # not safetensors: an in-memory checkpoint and a torch.save file
    torch.save(sd, tmp_path / "m.bin")
    for src in (open_checkpoint(sd), open_checkpoint(tmp_path / "m.bin")):
        out = tmp_path / f"o{id(src)}"
        with CheckpointWriter(out, [src.info(n) for n in sd]) as w:
            for n in sd:
                w.copy(n, src)
        got = open_checkpoint(out)
        for n, t in sd.items():
            assert torch.equal(got.get(n), t), n
    # a dtype change in the plan: converted by write()
    ck = _source(tmp_path, sd)
    infos = [TensorInfo("a.weight", (37, 11), torch.bfloat16)]
    with CheckpointWriter(tmp_path / "bf16", infos) as w:
        w.copy("a.weight", ck)
    got = open_checkpoint(tmp_path / "bf16").get("a.weight")
    assert got.dtype == torch.bfloat16 and torch.equal(got, sd["a.weight"].to(torch.bfloat16))
    # a shape change is write()'s error, and nothing is left
    infos = [TensorInfo("a.weight", (11, 37), torch.float32)]
    with (
        pytest.raises(BrickworkError, match="planned"),
        CheckpointWriter(tmp_path / "x", infos) as w,
    ):
        w.copy("a.weight", ck)
    assert not (tmp_path / "x").exists()


def test_copy_checks_plan_order_and_leaves_nothing(tmp_path):
    sd = _sd()
    ck = _source(tmp_path, sd)
    infos = [ck.info(n) for n in sd]
    before = sorted(p.name for p in tmp_path.iterdir())
    with (
        pytest.raises(RuntimeError, match="expected a.weight"),
        CheckpointWriter(tmp_path / "c", infos) as w,
    ):
        w.copy("b.bias", ck)
    with (
        pytest.raises(RuntimeError, match="expected nothing"),
        CheckpointWriter(tmp_path / "c", infos[:1]) as w,
    ):
        w.copy("a.weight", ck)
        w.copy("b.bias", ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_copy_of_a_truncated_source_is_an_error(tmp_path):
    sd = _sd()
    ck = _source(tmp_path, sd)
    f, offset, nbytes = ck.raw_range("a.weight")
    assert nbytes == 37 * 11 * 4
    with open(f, "r+b") as fh:  # cut the file inside a.weight, after the reader opened it
        fh.truncate(offset + 10)
    with (
        pytest.raises(CheckpointError, match="ended while reading tensor 'a.weight'"),
        CheckpointWriter(tmp_path / "c", [ck.info("a.weight")]) as w,
    ):
        w.copy("a.weight", ck)
    assert not (tmp_path / "c").exists()
