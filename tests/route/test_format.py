"""brickwork's MoE format: save_moe -> brickwork.load round trips; bad input; atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import leftovers
from safetensors.torch import load_file, save_file
from torch import nn

import brickwork
from brickwork.errors import CheckpointError, OutputExistsError
from brickwork.route import MoEBlock, save_moe
from brickwork.route.moefy import moefy

transformers = pytest.importorskip("transformers")


def _ids(seed=0):
    return torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bert_moe():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    dense = transformers.BertForSequenceClassification(cfg).eval()
    return dense, moefy(dense, n_experts=4, top_k=2, calibration=_ids(), steps=20).model


def _net():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16)),
        nn.Tanh(), nn.Linear(16, 3),
    ).eval()  # fmt: skip


def test_bert_round_trip_gives_identical_outputs(bert_moe, tmp_path):
    _, moe = bert_moe
    out = save_moe(moe, tmp_path / "m")
    meta = json.loads((out / "brickwork.json").read_text())
    assert (
        meta["format"] == "brickwork.moe"
        and meta["base"]["class"] == "BertForSequenceClassification"
    )
    assert [e["path"] for e in meta["moe"]] == [
        f"bert.encoder.layer.{i}.intermediate" for i in range(2)
    ]
    assert meta["identity"] == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    assert meta["moe"][0]["layer"]["combine"] == "sum" and meta["moe"][0]["layer"]["top_k"] == 2
    assert (out / "base_config.json").is_file() and (out / "README.md").is_file()
    # no config.json: transformers refuses the directory rather than loading a dense BERT
    # whose FFN weights would be missing (and silently random)
    assert not (out / "config.json").exists()
    with pytest.raises((OSError, ValueError)):
        transformers.AutoModel.from_pretrained(out)
    back = brickwork.load(out)
    assert type(back) is type(moe) and not back.training
    assert isinstance(back.bert.encoder.layer[1].intermediate, MoEBlock)
    with torch.no_grad():
        assert torch.equal(back(_ids(1)).logits, moe(_ids(1)).logits)
    sd = load_file(out / "model.safetensors")
    assert sd.keys() == moe.state_dict().keys()


def test_llama_round_trip_and_dtype_is_kept(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    dense = transformers.LlamaForCausalLM(cfg).eval()
    moe = moefy(dense, n_experts=8, top_k=3, calibration=_ids(), router="mlp", steps=10).model
    moe = moe.to(torch.bfloat16)
    back = brickwork.load(save_moe(moe, tmp_path / "m"))
    assert back.model.layers[0].mlp.moe.router_hidden == 32
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(back(_ids(2)).logits, moe(_ids(2)).logits)


def test_generic_module_needs_its_skeleton_which_is_not_changed(tmp_path):
    dense = _net()
    x = torch.randn(20, 6)
    moe = moefy(dense, n_experts=4, top_k=2, calibration=x, steps=20).model
    out = save_moe(moe, tmp_path / "m")
    assert not (out / "base_config.json").exists()
    with pytest.raises(
        CheckpointError, match=r"pass the dense model: brickwork.load\(path, base=module\)"
    ):
        brickwork.load(out)
    skeleton = _net()
    back = brickwork.load(out, base=skeleton)
    assert isinstance(back[1], MoEBlock) and isinstance(skeleton[1], nn.Sequential)
    with torch.no_grad():
        assert torch.equal(back(x), moe(x))


def test_a_whole_model_that_is_one_ffn_round_trips(tmp_path):
    dense = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    x = torch.randn(30, 8)
    moe = moefy(dense, n_experts=3, top_k=3, calibration=x, steps=5).model
    assert isinstance(moe, MoEBlock)
    back = brickwork.load(save_moe(moe, tmp_path / "m"), base=dense)
    with torch.no_grad():
        torch.testing.assert_close(back(x), dense(x), atol=1e-6, rtol=1e-5)


def test_bad_directories_give_clear_errors(bert_moe, tmp_path):
    _, moe = bert_moe
    out = save_moe(moe, tmp_path / "m")
    with pytest.raises(CheckpointError, match="no such directory"):
        brickwork.load(tmp_path / "nope")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="brickwork.json: missing.*AutoModel"):
        brickwork.load(hf)
    meta = json.loads((out / "brickwork.json").read_text())
    for bad, match in (
        ({**meta, "format": "mixtral"}, "field 'format' is 'mixtral'.*AutoModelForCausalLM"),
        ({**meta, "format_version": 9}, "field 'format_version' is 9"),
        ({**meta, "moe": {}}, "field 'moe' is dict, expected a list"),
        ({**meta, "base": {**meta["base"], "class": "os"}}, "base class 'os' is not a transformers model"),
    ):  # fmt: skip
        (out / "brickwork.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=match):
            brickwork.load(out)
    (out / "brickwork.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        brickwork.load(out)


def test_missing_or_misshapen_tensors_are_named(bert_moe, tmp_path):
    _, moe = bert_moe
    out = save_moe(moe, tmp_path / "m")
    sd = load_file(out / "model.safetensors")
    name = "bert.encoder.layer.0.intermediate.moe.down"
    save_file({k: v for k, v in sd.items() if k != name}, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        brickwork.load(out)
    save_file({**sd, name: sd[name][:, :3].contiguous()}, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not fit"):
        brickwork.load(out)


def test_writes_are_atomic_and_never_replace_inputs(bert_moe, tmp_path):
    dense, moe = bert_moe
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        save_moe(moe, out)
    assert (out / "keep.txt").read_text() == "mine"
    save_moe(moe, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "brickwork.json").is_file()
    assert leftovers(out) == ["m"]  # no temp dirs left behind
    src = tmp_path / "src"
    dense.save_pretrained(src)
    for bad in (src, src / "sub"):
        with pytest.raises(OutputExistsError, match="never writes over its inputs"):
            save_moe(moe, bad, copy_from=src, force=True)
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(CheckpointError, match="has no MoEBlock"):
        save_moe(dense, tmp_path / "dense")
    assert leftovers(tmp_path / "dense") == []


def test_side_files_of_the_reference_are_carried_over_but_not_its_config(bert_moe, tmp_path):
    dense, moe = bert_moe
    ref = tmp_path / "ref"
    dense.save_pretrained(ref)
    (ref / "1_Pooling").mkdir()
    (ref / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (ref / "2_Normalize").mkdir()
    (ref / "modules.json").write_text("[]")
    (ref / "preprocessor_config.json").write_text("{}")
    out = save_moe(moe, tmp_path / "m", copy_from=ref)
    assert (out / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert (out / "2_Normalize").is_dir() and (out / "modules.json").read_text() == "[]"
    assert (out / "preprocessor_config.json").exists()
    # the dense config stays base_config.json, and the dense weights are not copied over
    assert not (out / "config.json").exists() and (out / "base_config.json").exists()
    assert sorted(load_file(out / "model.safetensors")) == sorted(moe.state_dict())
