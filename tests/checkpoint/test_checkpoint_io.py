"""Reading every supported checkpoint form, and the atomic streaming writer."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from brickwork.checkpoint.reader import open_checkpoint
from brickwork.checkpoint.writer import CheckpointWriter, parse_size
from brickwork.errors import CheckpointError, OutputExistsError


def _sd():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "b.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "ids": torch.arange(5),
        "mask": torch.tensor([True, False]),
    }


def _same(ck, sd):
    assert sorted(ck.names) == sorted(sd)
    for k, v in sd.items():
        i = ck.info(k)
        assert i.shape == tuple(v.shape) and i.dtype == v.dtype, k
        assert torch.equal(ck.get(k), v), k


def test_single_safetensors_file(tmp_path):
    sd = _sd()
    save_file(sd, tmp_path / "m.safetensors")
    _same(open_checkpoint(tmp_path / "m.safetensors"), sd)


def test_metadata_comes_from_the_header_only(tmp_path, monkeypatch):
    import safetensors

    sd = _sd()
    save_file(sd, tmp_path / "m.safetensors")

    def no_data(*a, **k):
        raise AssertionError("tensor data read while opening")

    monkeypatch.setattr(safetensors, "safe_open", no_data)
    ck = open_checkpoint(tmp_path / "m.safetensors")
    assert ck.info("a.weight").shape == (8, 4)
    assert ck.num_parameters == 8 * 4 + 4 + 5 + 2


def test_hf_directory_sharded_and_not(tmp_path, llama_family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_family.base)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    whole = open_checkpoint(llama_family.base)
    sharded = open_checkpoint(tmp_path / "sharded")
    assert len(sharded.files()) > 1
    assert sharded.names and sorted(sharded.names) == sorted(whole.names)
    for n in whole.names:
        assert torch.equal(whole.get(n), sharded.get(n)), n
    # the index file itself is accepted as a path too
    via_index = open_checkpoint(tmp_path / "sharded" / "model.safetensors.index.json")
    assert sorted(via_index.names) == sorted(whole.names)
    assert whole.config["model_type"] == "llama"


def test_pytorch_bin_through_weights_only(tmp_path):
    sd = _sd()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    _same(open_checkpoint(tmp_path), sd)
    _same(open_checkpoint(tmp_path / "pytorch_model.bin"), sd)
    torch.save({"state_dict": sd}, tmp_path / "x.pt")  # Lightning-style wrapper
    _same(open_checkpoint(tmp_path / "x.pt"), sd)


def test_legacy_non_zip_torch_file(tmp_path):
    sd = _sd()
    torch.save(sd, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    _same(open_checkpoint(tmp_path / "old.bin"), sd)


def test_state_dict_and_module():
    sd = _sd()
    _same(open_checkpoint(sd), sd)
    lin = torch.nn.Linear(3, 2)
    ck = open_checkpoint(lin)
    assert sorted(ck.names) == ["bias", "weight"]
    assert torch.equal(ck.get("weight"), lin.weight.detach())


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size(123) == 123
    assert parse_size("2kb") == 2000
    for bad in ("abc", "-1GB", 0, "0"):
        with pytest.raises(Exception, match="size"):
            parse_size(bad)


def _write(out, sd, **kw):
    from brickwork.checkpoint.reader import StateDictCheckpoint

    infos = list(StateDictCheckpoint(sd).infos())
    with CheckpointWriter(out, infos, **kw) as w:
        for i in infos:
            w.write(i.name, sd[i.name])
    return out


def test_writer_round_trip_and_shards(tmp_path):
    sd = {f"t{i}": torch.full((10, 10), float(i)) for i in range(6)}  # 400 bytes each
    _write(tmp_path / "one", sd)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]
    assert {
        k: v for k, v in load_file(tmp_path / "one" / "model.safetensors").items()
    }.keys() == sd.keys()
    _write(tmp_path / "many", sd, shard_size=1000)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3  # two 400-byte tensors per 1000-byte shard
    assert index["metadata"]["total_size"] == 6 * 400
    for n, f in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / "many" / f)[n], sd[n])
    _same(open_checkpoint(tmp_path / "many"), sd)


def test_writer_refuses_existing_output_unless_forced(tmp_path):
    sd = {"x": torch.ones(2)}
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        _write(out, sd)
    assert (out / "keep.txt").read_text() == "old"
    _write(out, sd, force=True)
    assert not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_writer_leaves_nothing_on_failure(tmp_path):
    from brickwork.checkpoint.reader import StateDictCheckpoint

    sd = {f"t{i}": torch.ones(3) for i in range(4)}
    infos = list(StateDictCheckpoint(sd).infos())
    with pytest.raises(KeyboardInterrupt), CheckpointWriter(tmp_path / "out", infos) as w:
        w.write("t0", sd["t0"])
        w.write("t1", sd["t1"])
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # closing before every tensor was written is a failure too
    with (
        pytest.raises(RuntimeError, match="before all tensors"),
        CheckpointWriter(tmp_path / "out", infos) as w,
    ):
        w.write("t0", sd["t0"])
    assert list(tmp_path.iterdir()) == []


def test_writer_does_not_keep_tensors(tmp_path):
    from brickwork.checkpoint.reader import StateDictCheckpoint

    sd = {f"t{i}": torch.randn(64, 64) for i in range(3)}
    infos = list(StateDictCheckpoint(sd).infos())
    refs = []
    with CheckpointWriter(tmp_path / "out", infos, shard_size=20000) as w:
        for i in infos:
            t = sd[i.name].clone()
            refs.append(weakref.ref(t))
            w.write(i.name, t)
            del t
            assert all(r() is None for r in refs), "writer holds a written tensor"
    _same(open_checkpoint(tmp_path / "out"), sd)


def test_safetensors_written_by_brickwork_load_in_safetensors(tmp_path):
    sd = _sd()
    _write(tmp_path / "o", sd)
    loaded = load_file(tmp_path / "o" / "model.safetensors")
    for k, v in sd.items():
        assert torch.equal(loaded[k], v)


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        open_checkpoint(tmp_path / "m.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        open_checkpoint(tmp_path / "empty")
