"""End to end: tiny random Llama and BERT merged through the ``brickwork`` command, loaded
back with transformers, run forward; provenance, sharding, inspect, methods, --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import leftovers, write_yaml
from safetensors.torch import load_file

from brickwork.merge.registry import list_methods

IDS = torch.tensor([[1, 5, 9, 42, 7, 3]])


def _logits(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return m(IDS).logits


def _merge(run_cli, recipe, out, *extra):
    code, stdout, stderr = run_cli("merge", recipe, out, "-q", *extra)
    assert code == 0, stdout + stderr
    assert leftovers(out) == [out.name]
    return out


def test_linear_merge_of_copies_has_the_same_logits(run_cli, tmp_path, llama_family):
    r = write_yaml(
        tmp_path / "r.yaml",
        {
            "method": "linear",
            "models": [{"model": str(llama_family.ft1)}] * 2
            + [{"model": str(llama_family.ft1), "parameters": {"weight": 3}}],
        },
    )
    out = _merge(run_cli, r, tmp_path / "out")
    torch.testing.assert_close(_logits(out), _logits(llama_family.ft1), atol=1e-5, rtol=1e-5)


def test_brickwork_recipe_ties_llama(run_cli, tmp_path, llama_family):
    r = write_yaml(
        tmp_path / "r.yaml",
        {
            "method": "ties",
            "base": str(llama_family.base),
            "models": [
                {"model": str(llama_family.ft1), "parameters": {"weight": 1.0}},
                {"model": str(llama_family.ft2), "parameters": {"weight": 0.5}},
            ],
            "parameters": {
                "density": 0.5,
                "lambda": [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}],
            },
            "seed": 7,
        },
    )
    out = _merge(run_cli, r, tmp_path / "out")
    logits = _logits(out)
    assert logits.shape == (1, IDS.shape[1], 128) and torch.isfinite(logits).all()
    # the merge moved the weights away from the base
    a = load_file(out / "model.safetensors")
    b = load_file(llama_family.base / "model.safetensors")
    assert set(a) == set(b)
    assert not torch.equal(
        a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"]
    )

    # provenance, model card, copied side files
    prov = json.loads((out / "brickwork.json").read_text())
    assert prov["method"] == "ties" and prov["seed"] == 7
    assert set(prov["inputs"]) == {
        str(llama_family.base),
        str(llama_family.ft1),
        str(llama_family.ft2),
    }
    assert all(len(v) == 16 for v in prov["inputs"].values())
    assert prov["environment"]["brickwork"].startswith("0.")
    assert prov["recipe"]["parameters"]["density"] == 0.5
    card = (out / "README.md").read_text()
    assert "ties" in card and str(llama_family.ft1) in card
    for f in (
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        assert (out / f).read_bytes() == (llama_family.base / f).read_bytes(), f
    assert (out / "brickwork_recipe.yaml").is_file()


def test_input_checksums_are_file_hashes(run_cli, tmp_path, llama_family):
    import hashlib

    r = write_yaml(
        tmp_path / "r.yaml", {"method": "linear", "models": [{"model": str(llama_family.ft1)}]}
    )
    out = _merge(run_cli, r, tmp_path / "out")
    prov = json.loads((out / "brickwork.json").read_text())
    digest = hashlib.sha256((llama_family.ft1 / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert prov["inputs"][str(llama_family.ft1)] == digest


def test_mergekit_recipe_as_is(run_cli, tmp_path, llama_family):
    text = f"""\
models:
  - model: {llama_family.base}
  - model: {llama_family.ft1}
    parameters:
      density: 0.6
      weight: 0.7
  - model: {llama_family.ft2}
    parameters:
      density: [0.4, 0.8]
      weight: 0.3
merge_method: dare_ties
base_model: {llama_family.base}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""
    r = write_yaml(tmp_path / "mk.yaml", text)
    out = _merge(run_cli, r, tmp_path / "out", "--seed", "3")
    sd = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert json.loads((out / "brickwork.json").read_text())["seed"] == 3
    logits = _logits(out)
    assert torch.isfinite(logits.float()).all()


def test_mergekit_slices_passthrough_stacks_layers(run_cli, tmp_path, llama_family):
    text = f"""\
slices:
  - sources:
      - model: {llama_family.ft1}
        layer_range: [0, 2]
  - sources:
      - model: {llama_family.ft2}
        layer_range: [1, 2]
merge_method: passthrough
dtype: float32
"""
    out = _merge(run_cli, write_yaml(tmp_path / "mk.yaml", text), tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    sd = load_file(out / "model.safetensors")
    a = load_file(llama_family.ft1 / "model.safetensors")
    b = load_file(llama_family.ft2 / "model.safetensors")
    for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(sd[f"model.layers.0.{suffix}"], a[f"model.layers.0.{suffix}"])
        assert torch.equal(sd[f"model.layers.1.{suffix}"], a[f"model.layers.1.{suffix}"])
        assert torch.equal(sd[f"model.layers.2.{suffix}"], b[f"model.layers.1.{suffix}"])
    assert torch.equal(sd["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(sd["lm_head.weight"], b["lm_head.weight"])  # post weights: last slice
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    assert len(m.model.layers) == 3
    assert torch.isfinite(_logits(out)).all()


def test_mergekit_slices_with_merging_method(run_cli, tmp_path, llama_family):
    text = f"""\
slices:
  - sources:
      - model: {llama_family.base}
        layer_range: [0, 2]
      - model: {llama_family.ft1}
        layer_range: [0, 2]
merge_method: slerp
base_model: {llama_family.base}
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - value: 0.5
"""
    out = _merge(run_cli, write_yaml(tmp_path / "mk.yaml", text), tmp_path / "out")
    sd = load_file(out / "model.safetensors")
    base = load_file(llama_family.base / "model.safetensors")
    ft = load_file(llama_family.ft1 / "model.safetensors")
    n = "self_attn.o_proj.weight"
    torch.testing.assert_close(sd[f"model.layers.0.{n}"], base[f"model.layers.0.{n}"])  # t=0
    torch.testing.assert_close(sd[f"model.layers.1.{n}"], ft[f"model.layers.1.{n}"])  # t=1
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_bert_merge_loads_in_automodel(run_cli, tmp_path, bert_family):
    from transformers import AutoModel

    r = write_yaml(
        tmp_path / "r.yaml",
        {
            "method": "task_arithmetic",
            "base": str(bert_family.base),
            "models": [{"model": str(bert_family.ft1)}, {"model": str(bert_family.ft2)}],
            "parameters": {"lambda": 0.5},
        },
    )
    out = _merge(run_cli, r, tmp_path / "out")
    m = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        h = m(input_ids=IDS).last_hidden_state
    assert h.shape == (1, IDS.shape[1], 32) and torch.isfinite(h).all()
    # θ0 + 0.5(τ1 + τ2) on a tensor, checked directly
    sd = load_file(out / "model.safetensors")
    b, x, y = (
        load_file(d / "model.safetensors")
        for d in (bert_family.base, bert_family.ft1, bert_family.ft2)
    )
    n = "encoder.layer.1.attention.self.query.weight"
    torch.testing.assert_close(sd[n], b[n] + 0.5 * ((x[n] - b[n]) + (y[n] - b[n])))


def test_bert_linear_copies_same_hidden_states(run_cli, tmp_path, bert_family):
    from transformers import AutoModel

    r = write_yaml(
        tmp_path / "r.yaml", {"method": "linear", "models": [{"model": str(bert_family.ft1)}] * 2}
    )
    out = _merge(run_cli, r, tmp_path / "out")
    outs = []
    for p in (out, bert_family.ft1):
        m = AutoModel.from_pretrained(p).eval()
        with torch.no_grad():
            outs.append(m(input_ids=IDS).last_hidden_state)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_sharded_output_loads_in_transformers(run_cli, tmp_path, llama_family):
    r = write_yaml(
        tmp_path / "r.yaml", {"method": "linear", "models": [{"model": str(llama_family.ft1)}]}
    )
    out = _merge(run_cli, r, tmp_path / "out", "--shard-size", "20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    torch.testing.assert_close(_logits(out), _logits(llama_family.ft1), atol=1e-5, rtol=1e-5)


def test_relative_model_paths_resolve_against_the_recipe(run_cli, tmp_path, llama_family):
    import shutil

    shutil.copytree(llama_family.ft1, tmp_path / "m1")
    r = write_yaml(
        tmp_path / "r.yaml", {"method": "linear", "models": [{"model": "m1"}, {"model": "./m1"}]}
    )
    _merge(run_cli, r, tmp_path / "out")


def test_tied_embeddings(run_cli, tmp_path, llama_config_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    cfg = llama_config_factory(tie_word_embeddings=True)
    for name in ("a", "b"):
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / name)
    assert "lm_head.weight" not in load_file(tmp_path / "a" / "model.safetensors")
    r = write_yaml(
        tmp_path / "r.yaml",
        {
            "method": "linear",
            "models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "a")}],
        },
    )
    out = _merge(run_cli, r, tmp_path / "out")
    torch.testing.assert_close(_logits(out), _logits(tmp_path / "a"), atol=1e-5, rtol=1e-5)


def test_python_api_merge_to_disk(tmp_path, llama_family):
    import brickwork

    out = brickwork.merge(
        {
            "method": "linear",
            "models": [{"model": str(llama_family.ft1)}, {"model": str(llama_family.ft2)}],
        },
        tmp_path / "out",
        progress=False,
    )
    a = load_file(llama_family.ft1 / "model.safetensors")
    b = load_file(llama_family.ft2 / "model.safetensors")
    sd = load_file(Path(out) / "model.safetensors")
    for k in a:
        torch.testing.assert_close(sd[k], (a[k] + b[k]) / 2)


def test_merge_modules_returns_a_new_module(llama_family):
    from transformers import AutoModelForCausalLM

    from brickwork.merge.api import merge_modules

    m1 = AutoModelForCausalLM.from_pretrained(llama_family.ft1).eval()
    m2 = AutoModelForCausalLM.from_pretrained(llama_family.ft1).eval()
    before = {k: v.clone() for k, v in m1.state_dict().items()}
    merged = merge_modules("linear", [m1, m2])
    assert merged is not m1
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, m1(IDS).logits, atol=1e-5, rtol=1e-5)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, before[k])


def test_inspect_one_and_two(run_cli, llama_family):
    code, out, err = run_cli("inspect", llama_family.ft1)
    assert code == 0, err
    from brickwork.checkpoint.reader import open_checkpoint

    n = open_checkpoint(llama_family.ft1).num_parameters
    assert f"{n:,} parameters" in out
    assert "model.layers.0.self_attn.q_proj.weight" in out
    code, out, err = run_cli("inspect", llama_family.ft1, llama_family.ft2, "--limit", "3")
    assert code == 0, err
    assert "cosine" in out and "common tensors" in out
    code, out, err = run_cli("inspect", llama_family.ft1, llama_family.ft1)
    assert "1.000000" in out  # identical models: cosine 1


def test_methods_lists_every_registered_method(run_cli):
    code, out, err = run_cli("methods")
    assert code == 0, err
    for name in list_methods():
        assert name in out, name


def test_help_does_not_import_torch():
    code = "import brickwork.cli, sys; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "False"
    exe = Path(sys.executable).with_name("brickwork")
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "merge" in p.stdout and "Traceback" not in p.stderr
    code = (
        "import sys; from brickwork.cli import app\n"
        "try:\n    app(['merge', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stdout.strip().endswith("False"), p.stdout + p.stderr


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_executor_streams_and_keeps_no_references(llama_family, method):
    """Memory bound without timing: tensors reach the sink in plan order, and (no gc run:
    refcounting must free them) by the time
    tensor k is written no earlier output and no input of an earlier job is still alive."""
    import weakref

    from brickwork.checkpoint.reader import open_checkpoint
    from brickwork.merge.executor import execute
    from brickwork.merge.plan import build_plan
    from brickwork.recipe import parse_recipe

    keys = {"base": llama_family.base, "a": llama_family.ft1, "b": llama_family.ft2}
    ckpts = {k: open_checkpoint(p) for k, p in keys.items()}
    live_inputs: list[weakref.ref] = []
    for ck in ckpts.values():
        real = ck.get

        def spy(name, real=real, **kw):
            t = real(name, **kw)
            live_inputs.append(weakref.ref(t))
            return t

        ck.get = spy
    recipe = parse_recipe(
        {"method": method, "base": "base", "models": [{"model": "a"}, {"model": "b"}]}
    )
    plan = build_plan(recipe, ckpts)
    order: list[str] = []
    outputs: list[weakref.ref] = []
    peak = {"inputs": 0}

    class Sink:
        def write(self, name, tensor):
            assert all(r() is None for r in outputs), "an earlier output is still referenced"
            alive = sum(r() is not None for r in live_inputs)
            peak["inputs"] = max(peak["inputs"], alive)
            order.append(name)
            outputs.append(weakref.ref(tensor))

    execute(plan, ckpts, Sink(), progress=False)
    assert order == [j.info.name for j in plan.jobs]
    assert len(live_inputs) >= 2 * len(plan.jobs)  # the spy saw the reads
    # at most the current job's inputs (2 models + base) are alive at any write
    assert peak["inputs"] <= 3
