"""``brickwork route moefy RECIPE OUT`` on a tiny BERT directory with a word-level tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _helpers import leftovers, write_yaml

import brickwork
from brickwork.route.moe import MoEBlock

transformers = pytest.importorskip("transformers")

WORDS = [f"w{i}" for i in range(100)]


@pytest.fixture(scope="module")
def bert_dir(bert_family, tmp_path_factory):
    """The fixture's tiny BERT plus a BertTokenizer over a 105-word vocabulary."""
    d = tmp_path_factory.mktemp("moefy") / "bert"
    shutil.copytree(bert_family.base, d)
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    transformers.BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    lines = [
        " ".join(WORDS[int(i)] for i in torch.randint(0, 100, (int(n),), generator=g))
        for n in torch.randint(3, 12, (40,), generator=g)
    ]
    (d.parent / "calib.txt").write_text("\n".join(lines) + "\n\n")
    return d


def _recipe(bert_dir, **overrides) -> dict:
    return {
        "model": str(bert_dir),
        "n_experts": 4,
        "top_k": 2,
        "steps": 30,
        "calibration": {"text": str(bert_dir.parent / "calib.txt"), "lines": 24, "max_length": 16},
        **overrides,
    }


def test_moefy_writes_a_loadable_moe_with_provenance(run_cli, tmp_path, bert_dir):
    recipe = write_yaml(tmp_path / "m.yaml", _recipe(bert_dir, router="mlp", router_hidden=8))
    code, stdout, err = run_cli("route", "moefy", recipe, tmp_path / "out", "--seed", "3")
    assert code == 0, err
    assert "wrote" in stdout and "kept activation mass" in stdout
    out = tmp_path / "out"
    meta = json.loads((out / "brickwork.json").read_text())
    assert meta["kind"] == "route.moefy" and meta["settings"]["seed"] == 3
    assert meta["inputs"]["calibration"]["lines"] == 24
    assert len(meta["report"]["layers"]) == 2
    assert (out / "vocab.txt").is_file() and (out / "base_config.json").is_file()
    assert "kept activation mass" in (out / "README.md").read_text()
    model = brickwork.load(out)
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == 2 and {b.moe.top_k for b in blocks} == {2}
    assert {b.moe.router_hidden for b in blocks} == {8}
    dense = transformers.BertModel.from_pretrained(bert_dir).eval()
    for b in blocks:
        b.moe.top_k = 4  # all experts active: the dense model again
    ids = torch.randint(5, 105, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).last_hidden_state, dense(ids).last_hidden_state, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n_experst": 4}, "unknown key 'n_experst'. Did you mean 'n_experts'?"),
        ({"top_k": 5}, "top_k must be at most n_experts (4)"),
        ({"model": "missing/dir"}, "model 'missing/dir': no such file or directory"),
        ({"clustering": "spectral"}, "clustering"),
        ({"n_experts": 3, "top_k": 1}, "d_ff=64 is not divisible by n_experts=3"),
    ],
)
def test_bad_recipe_exits_2_names_culprit_writes_nothing(
    run_cli, tmp_path, bert_dir, overrides, match
):
    recipe = write_yaml(tmp_path / "m.yaml", _recipe(bert_dir, **overrides))
    code, _, err = run_cli("route", "moefy", recipe, tmp_path / "out", "-q")
    assert code == 2
    assert match in err
    assert leftovers(tmp_path / "out") == []


def test_never_overwrites_inputs_or_outputs_without_force(run_cli, tmp_path, bert_dir):
    before = sorted(p.name for p in bert_dir.iterdir())
    recipe = write_yaml(tmp_path / "m.yaml", _recipe(bert_dir))
    for target in (bert_dir, bert_dir / "sub", bert_dir.parent / "calib.txt"):
        code, _, err = run_cli("route", "moefy", recipe, target, "-q", "--force")
        assert code == 2 and "never writes over its inputs" in err
    assert sorted(p.name for p in bert_dir.iterdir()) == before
    (tmp_path / "out").mkdir()
    code, _, err = run_cli("route", "moefy", recipe, tmp_path / "out", "-q")
    assert code == 2 and "already exists" in err
    recipe = write_yaml(tmp_path / "m.yaml", _recipe(bert_dir, force=True, steps=5))
    code, _, err = run_cli("route", "moefy", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    assert (tmp_path / "out" / "brickwork.json").is_file()


def test_a_model_without_tokenizer_is_refused_before_any_work(
    run_cli, tmp_path, bert_family, bert_dir
):
    recipe = write_yaml(tmp_path / "m.yaml", _recipe(bert_dir, model=str(bert_family.base)))
    code, _, err = run_cli("route", "moefy", recipe, tmp_path / "out", "-q")
    assert code == 2 and "no usable tokenizer" in err and str(bert_family.base) in err
    assert leftovers(tmp_path / "out") == []


def test_calibration_text_the_tokenizer_cannot_read_is_refused(run_cli, tmp_path, bert_dir):
    (tmp_path / "greek.txt").write_text("αβγ δεζ ηθι\nκλμ νξο\n")
    calib = {"text": str(tmp_path / "greek.txt"), "lines": 2}
    recipe = write_yaml(tmp_path / "m.yaml", _recipe(bert_dir, calibration=calib))
    code, _, err = run_cli("route", "moefy", recipe, tmp_path / "out", "-q")
    assert code == 2 and "calibration tokens to [UNK]" in err
    assert leftovers(tmp_path / "out") == []
