"""Every bad input gives a short error naming the culprit, a non-zero exit, no traceback,
and writes nothing: no output directory, no temporary directory next to it."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from _helpers import leftovers, write_yaml
from safetensors.torch import load_file, save_file


def _recipe(tmp_path, fam, **overrides):
    data = {
        "method": "ties",
        "base": str(fam.base),
        "models": [
            {"model": str(fam.ft1), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(fam.ft2), "parameters": {"weight": 0.5}},
        ],
        "parameters": {"lambda": 1.0},
    }
    data.update(overrides)
    return write_yaml(tmp_path / "recipe.yaml", data)


def _fails(run_cli, tmp_path, recipe, *needles, extra=()):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("merge", recipe, out, "-q", *extra)
    assert code != 0, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert stderr.startswith("error: "), stderr
    for n in needles:
        assert n in stderr, f"{n!r} not in {stderr!r}"
    assert leftovers(out) == [], "something was written"
    return stderr


def _model_dir(tmp_path, src: Path, name: str, edit=None) -> Path:
    """A copy of HF dir ``src`` whose state dict passed through ``edit``."""
    d = tmp_path / name
    shutil.copytree(src, d)
    if edit is not None:
        sd = load_file(d / "model.safetensors")
        edit(sd)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_good_recipe_works(run_cli, tmp_path, llama_family):
    # the baseline the error tests perturb
    code, _, err = run_cli("merge", _recipe(tmp_path, llama_family), tmp_path / "out", "-q")
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_misspelt_key(run_cli, tmp_path, llama_family):
    r = _recipe(
        tmp_path,
        llama_family,
        models=[{"model": str(llama_family.ft1), "paramters": {"weight": 0.5}}],
    )
    _fails(run_cli, tmp_path, r, "paramters", "Did you mean 'parameters'")


def test_misspelt_top_level_key(run_cli, tmp_path, llama_family):
    r = write_yaml(
        tmp_path / "r.yaml",
        {"method": "linear", "models": [{"model": str(llama_family.ft1)}], "dtyp": "float16"},
    )
    _fails(run_cli, tmp_path, r, "dtyp", "Did you mean 'dtype'")


def test_unknown_method(run_cli, tmp_path, llama_family):
    _fails(
        run_cli,
        tmp_path,
        _recipe(tmp_path, llama_family, method="tie"),
        "'tie'",
        "Did you mean 'ties'",
    )


def test_unknown_parameter_of_method(run_cli, tmp_path, llama_family):
    r = _recipe(tmp_path, llama_family, parameters={"lamda": 1.0})
    _fails(run_cli, tmp_path, r, "lamda", "Did you mean 'lambda'")


def test_out_of_range_value(run_cli, tmp_path, llama_family):
    r = _recipe(
        tmp_path,
        llama_family,
        models=[{"model": str(llama_family.ft1), "parameters": {"density": 1.5}}],
    )
    _fails(run_cli, tmp_path, r, "density", "1.5")


def test_missing_model_path(run_cli, tmp_path, llama_family):
    missing = str(tmp_path / "no_such_model")
    r = _recipe(tmp_path, llama_family, models=[{"model": missing}])
    _fails(run_cli, tmp_path, r, "no_such_model")


def test_missing_recipe_and_bad_yaml(run_cli, tmp_path):
    _fails(run_cli, tmp_path, tmp_path / "nope.yaml", "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: linear\nmodels: [a, b\n")
    _fails(run_cli, tmp_path, bad, "bad.yaml", "YAML")
    listy = write_yaml(tmp_path / "list.yaml", "- a\n- b\n")
    _fails(run_cli, tmp_path, listy, "mapping")


def test_corrupt_safetensors(run_cli, tmp_path, llama_family):
    d = _model_dir(tmp_path, llama_family.ft1, "corrupt")
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    _fails(
        run_cli, tmp_path, _recipe(tmp_path, llama_family, models=[{"model": str(d)}]), "corrupt"
    )


def test_truncated_safetensors(run_cli, tmp_path, llama_family):
    d = _model_dir(tmp_path, llama_family.ft1, "trunc")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    err = _fails(
        run_cli, tmp_path, _recipe(tmp_path, llama_family, models=[{"model": str(d)}]), str(f)
    )
    assert "truncated" in err


def test_corrupt_pytorch_bin(run_cli, tmp_path, llama_family):
    d = tmp_path / "garbage_bin"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04junkjunk" * 50)
    _fails(
        run_cli,
        tmp_path,
        _recipe(tmp_path, llama_family, models=[{"model": str(d)}]),
        "pytorch_model.bin",
    )
    (d / "pytorch_model.bin").write_bytes(b"not a pickle at all" * 50)
    _fails(
        run_cli,
        tmp_path,
        _recipe(tmp_path, llama_family, models=[{"model": str(d)}]),
        "pytorch_model.bin",
    )
    zipped = tmp_path / "zip_trunc"
    zipped.mkdir()
    torch.save({"w": torch.ones(1000)}, zipped / "pytorch_model.bin")
    raw = (zipped / "pytorch_model.bin").read_bytes()
    (zipped / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    _fails(
        run_cli,
        tmp_path,
        _recipe(tmp_path, llama_family, models=[{"model": str(zipped)}]),
        "pytorch_model.bin",
    )


def test_shape_mismatch(run_cli, tmp_path, llama_family):
    name = "model.layers.1.mlp.up_proj.weight"

    def edit(sd):
        sd[name] = sd[name][:-1].contiguous()

    d = _model_dir(tmp_path, llama_family.ft2, "shape", edit)
    r = _recipe(
        tmp_path, llama_family, models=[{"model": str(llama_family.ft1)}, {"model": str(d)}]
    )
    _fails(run_cli, tmp_path, r, name, "shape", "nothing was written")


def test_tensor_missing_from_one_model(run_cli, tmp_path, llama_family):
    name = "model.layers.0.self_attn.k_proj.weight"
    d = _model_dir(tmp_path, llama_family.ft2, "missing", lambda sd: sd.pop(name))
    r = _recipe(
        tmp_path, llama_family, models=[{"model": str(llama_family.ft1)}, {"model": str(d)}]
    )
    _fails(run_cli, tmp_path, r, name, "on_missing")


def test_missing_tensor_can_be_copied_from_base(run_cli, tmp_path, llama_family):
    name = "model.layers.0.self_attn.k_proj.weight"
    d = _model_dir(tmp_path, llama_family.ft2, "missing", lambda sd: sd.pop(name))
    r = _recipe(
        tmp_path,
        llama_family,
        models=[{"model": str(llama_family.ft1)}, {"model": str(d)}],
        on_missing="base",
    )
    code, _, err = run_cli("merge", r, tmp_path / "out", "-q")
    assert code == 0, err
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out[name], load_file(llama_family.base / "model.safetensors")[name])


def test_existing_output_needs_force(run_cli, tmp_path, llama_family):
    r = _recipe(tmp_path, llama_family)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = run_cli("merge", r, out, "-q")
    assert code != 0 and "--force" in err and "Traceback" not in err
    assert (out / "old.txt").read_text() == "old"
    assert leftovers(out) == ["out"]
    code, _, err = run_cli("merge", r, out, "-q", "--force")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(out) == ["out"]


def test_output_equal_to_or_inside_an_input_is_refused(run_cli, tmp_path, llama_family):
    d = _model_dir(tmp_path, llama_family.ft1, "victim")
    before = sorted(p.name for p in d.iterdir())
    r = _recipe(tmp_path, llama_family, models=[{"model": str(d)}])
    for out in (d, d / "sub", tmp_path):
        code, _, err = run_cli("merge", r, out, "-q", "--force")
        assert code != 0 and "Traceback" not in err
        assert "input" in err and "victim" in err, err
    assert sorted(p.name for p in d.iterdir()) == before


class _Evil:
    marker: str = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_never_run(run_cli, tmp_path, llama_family, zip_format):
    marker = tmp_path / "PWNED"
    evil = _Evil()
    evil.marker = str(marker)
    d = tmp_path / "evil"
    d.mkdir()
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(2), "x": evil},
        d / "pytorch_model.bin",
        _use_new_zipfile_serialization=zip_format,
    )
    assert not marker.exists()
    err = _fails(
        run_cli, tmp_path, _recipe(tmp_path, llama_family, models=[{"model": str(d)}]), "refused"
    )
    assert "pytorch_model.bin" in err
    assert not marker.exists(), "unpickling ran code"


def test_plain_pickle_with_code_is_refused(run_cli, tmp_path, llama_family):
    import pickle

    marker = tmp_path / "PWNED"
    evil = _Evil()
    evil.marker = str(marker)
    d = tmp_path / "evil"
    d.mkdir()
    (d / "model.pt").write_bytes(pickle.dumps({"w": evil}))
    _fails(
        run_cli, tmp_path, _recipe(tmp_path, llama_family, models=[{"model": str(d)}]), "model.pt"
    )
    assert not marker.exists()


def _fail_after(monkeypatch, n, exc):
    from brickwork.merge import executor

    real = executor.run_job
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(executor, "run_job", flaky)
    return calls


def test_failure_mid_write_leaves_nothing(run_cli, tmp_path, llama_family, monkeypatch):
    from brickwork.errors import MergeComputationError

    calls = _fail_after(monkeypatch, 5, MergeComputationError("simulated failure on tensor 6"))
    _fails(run_cli, tmp_path, _recipe(tmp_path, llama_family), "simulated failure")
    assert calls["n"] == 6


def test_unexpected_exception_mid_write_leaves_nothing(tmp_path, llama_family, monkeypatch):
    from brickwork.merge.api import merge

    _fail_after(monkeypatch, 7, RuntimeError("disk on fire"))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge(_recipe(tmp_path, llama_family), out, progress=False)
    assert leftovers(out) == []


def test_interrupt_mid_write_leaves_nothing(run_cli, tmp_path, llama_family, monkeypatch):
    _fail_after(monkeypatch, 3, KeyboardInterrupt())
    out = tmp_path / "out"
    code, _, err = run_cli("merge", _recipe(tmp_path, llama_family), out, "-q")
    assert code != 0 and "Traceback" not in err
    assert leftovers(out) == []


def test_failure_after_all_tensors_before_rename(tmp_path, llama_family, monkeypatch):
    from brickwork.merge import api

    def boom():
        raise OSError("cannot write provenance")

    monkeypatch.setattr(api, "environment", boom)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        api.merge(_recipe(tmp_path, llama_family), out, progress=False)
    assert leftovers(out) == []


def test_failure_with_force_keeps_the_old_output(run_cli, tmp_path, llama_family, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    from brickwork.errors import MergeComputationError

    _fail_after(monkeypatch, 2, MergeComputationError("simulated"))
    code, _, err = run_cli("merge", _recipe(tmp_path, llama_family), out, "-q", "--force")
    assert code != 0
    assert (out / "old.txt").read_text() == "old"
    assert leftovers(out) == ["out"]


def test_bad_options(run_cli, tmp_path, llama_family):
    r = _recipe(tmp_path, llama_family)
    _fails(run_cli, tmp_path, r, "shard size", extra=("--shard-size", "lots"))
    _fails(run_cli, tmp_path, r, "dtype", extra=("--dtype", "int8"))


def test_bad_mergekit_dtype(run_cli, tmp_path, llama_family):
    r = write_yaml(
        tmp_path / "mk.yaml",
        {
            "merge_method": "linear",
            "models": [{"model": str(llama_family.ft1)}, {"model": str(llama_family.ft2)}],
            "dtype": "int8",
        },
    )
    _fails(run_cli, tmp_path, r, "int8")


def test_slices_with_base_method_but_no_base(run_cli, tmp_path, llama_family):
    r = write_yaml(
        tmp_path / "mk.yaml",
        {
            "merge_method": "ties",
            "slices": [
                {
                    "sources": [
                        {"model": str(llama_family.ft1), "layer_range": [0, 2]},
                        {"model": str(llama_family.ft2), "layer_range": [0, 2]},
                    ]
                }
            ],
        },
    )
    _fails(run_cli, tmp_path, r, "base")


def test_slice_layer_range_beyond_the_model(run_cli, tmp_path, llama_family):
    r = write_yaml(
        tmp_path / "mk.yaml",
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(llama_family.ft1), "layer_range": [0, 5]}]}],
        },
    )
    _fails(run_cli, tmp_path, r, "layer_range", "2 layers")


def test_inspect_missing_path(run_cli, tmp_path):
    code, _, err = run_cli("inspect", tmp_path / "nope")
    assert code != 0 and "nope" in err and "Traceback" not in err


def test_cli_error_in_a_real_process(tmp_path, llama_family):
    """The installed command: exit status, message and no traceback, end to end."""
    import subprocess

    r = _recipe(tmp_path, llama_family, method="tie")
    exe = Path(sys.executable).with_name("brickwork")
    p = subprocess.run(
        [str(exe), "merge", str(r), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert p.returncode == 2
    assert "Did you mean 'ties'" in p.stderr and "Traceback" not in p.stderr
    assert leftovers(tmp_path / "out") == []


def test_corrupt_config_json(run_cli, tmp_path, llama_family):
    d = _model_dir(tmp_path, llama_family.base, "badcfg")
    (d / "config.json").write_text("{not json")
    r = _recipe(tmp_path, llama_family, base=str(d))
    _fails(run_cli, tmp_path, r, "config.json")
    json.loads((llama_family.base / "config.json").read_text())  # the original is untouched


def test_linear_weights_that_sum_to_zero_are_refused(run_cli, tmp_path, llama_family):
    # normalize: true divides by the sum of the weights; mergekit writes inf / nan here
    r = _recipe(
        tmp_path,
        llama_family,
        method="linear",
        models=[
            {"model": str(llama_family.ft1), "parameters": {"weight": 1.0}},
            {"model": str(llama_family.ft2), "parameters": {"weight": -1.0}},
        ],
        parameters={},
    )
    _fails(run_cli, tmp_path, r, "sum to 0", "normalize: false", "tensor '")
