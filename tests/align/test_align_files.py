"""``brickwork align A B OUT`` and a merge recipe's ``align:`` block, on model directories.

Properties (STYLE.md §5): the written B' computes B's function and loads in transformers;
aligning a randomly permuted copy of A onto A writes A's weights back; inputs are untouched;
a recipe that aligns a permuted copy of A before ``linear`` gives A back, and without
``align:`` it does not. Errors name the file and what to do.
"""

from __future__ import annotations

import json

import pytest
import torch

from brickwork.align.spec import apply_permutations
from tests._helpers import leftovers, write_yaml

pytest.importorskip("transformers")
pytest.importorskip("scipy")


def _config(kind: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if kind == "llama":
        return LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            tie_word_embeddings=False,
        )  # fmt: skip
    if kind == "gpt2":
        return GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32,
    )  # fmt: skip


def _model(kind: str, seed: int):
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _config(kind)
    cfg._attn_implementation = "eager"
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    return cls.from_config(cfg).eval()


def _spec(model, **kw):
    from brickwork.align.hf_spec import hf_permutation_spec

    return hf_permutation_spec(model.config, model.state_dict().keys(), **kw)


def _random_perms(spec, seed):
    g = torch.Generator().manual_seed(seed)
    return {grp.name: torch.randperm(grp.size, generator=g) for grp in spec.groups}


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module", params=["llama", "gpt2", "bert"])
def family(request, tmp_path_factory):
    """A (seed 0), B (seed 1, another initialisation) and P (A with random permutations)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"align-{kind}")
    a, b = _model(kind, 0), _model(kind, 1)
    p = _model(kind, 0)
    spec = _spec(a)
    p.load_state_dict(apply_permutations(a.state_dict(), spec, _random_perms(spec, 5)))
    dirs = {}
    for name, m in (("A", a), ("B", b), ("P", p)):
        m.save_pretrained(root / name)
        dirs[name] = root / name
    return kind, dirs


def _digest(d):
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def test_aligned_b_loads_and_computes_b(run_cli, tmp_path, family):
    from transformers import AutoModel, AutoModelForCausalLM

    kind, d = family
    before = {k: _digest(v) for k, v in d.items()}
    code, out, err = run_cli("align", d["A"], d["B"], tmp_path / "out", "-q")
    assert code == 0, out + err
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    b = cls.from_pretrained(d["B"], attn_implementation="eager").eval()
    b2 = cls.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_outputs(b2, ids), _outputs(b, ids), atol=1e-5, rtol=0)
    moved = sum(not torch.equal(x, b.state_dict()[k]) for k, x in b2.state_dict().items())
    assert moved > 0  # another initialisation: weight matching does permute something
    prov = json.loads((tmp_path / "out" / "brickwork.json").read_text())
    s = prov["alignment"]
    assert prov["kind"] == "align" and s["method"] == "weight" and s["units_moved"] > 0
    assert s["objective_after"] > s["objective_before"]
    perms = json.loads((tmp_path / "out" / "brickwork_permutations.json").read_text())
    assert len(perms) == s["groups"]
    assert {k: _digest(v) for k, v in d.items()} == before  # inputs untouched
    assert leftovers(tmp_path / "out") == ["out"]  # no staging directory left beside it


def test_permuted_copy_is_aligned_back_to_a(run_cli, tmp_path, family):
    from safetensors.torch import load_file

    _, d = family
    code, out, err = run_cli("align", d["A"], d["P"], tmp_path / "out", "-q")
    assert code == 0, out + err
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(d["A"] / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_recipe_align_block_before_linear(run_cli, tmp_path, family):
    from safetensors.torch import load_file

    _, d = family
    models = [{"model": str(d["A"])}, {"model": str(d["P"])}]
    r = write_yaml(tmp_path / "r.yaml", {"method": "linear", "models": models})
    ra = write_yaml(
        tmp_path / "ra.yaml",
        {"method": "linear", "models": models, "align": {"to": str(d["A"])}},
    )
    assert run_cli("merge", r, tmp_path / "naive", "-q")[0] == 0
    code, out, err = run_cli("merge", ra, tmp_path / "aligned", "-q")
    assert code == 0, out + err
    a = load_file(d["A"] / "model.safetensors")
    naive = load_file(tmp_path / "naive" / "model.safetensors")
    aligned = load_file(tmp_path / "aligned" / "model.safetensors")
    assert all(torch.allclose(aligned[k], a[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(naive[k], a[k], atol=1e-3) for k in a)
    prov = json.loads((tmp_path / "aligned" / "brickwork.json").read_text())
    assert prov["alignment"]["to"] == str(d["A"])
    assert list(prov["alignment"]["models"]) == [str(d["P"])]


def test_errors_name_the_problem(run_cli, tmp_path, family):
    kind, d = family
    out = tmp_path / "out"
    code, _, err = run_cli("align", d["A"], d["B"], out, "--data", d["A"] / "config.json")
    assert code != 0 and "--method activation" in err and not out.exists()
    code, _, err = run_cli("align", d["A"], d["B"], out, "--method", "activatoin")
    assert code != 0 and "activation" in err and not out.exists()
    code, _, err = run_cli("align", d["A"], d["B"], out, "--method", "activation")
    assert code != 0 and "--data" in err and not out.exists()
    code, _, err = run_cli("align", d["A"], d["B"], d["B"] / "sub")
    assert code != 0 and "overlaps input" in err
    out.mkdir()
    code, _, err = run_cli("align", d["A"], d["B"], out)
    assert code != 0 and "--force" in err


def test_no_config_or_other_architecture_is_an_error(run_cli, tmp_path, family):
    from safetensors.torch import load_file, save_file

    kind, d = family
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(d["B"] / "model.safetensors"), bare)
    code, _, err = run_cli("align", d["A"], bare, tmp_path / "o1")
    assert code != 0 and "config.json" in err and "brickwork.align(" in err
    other = "gpt2" if kind != "gpt2" else "llama"
    _model(other, 0).save_pretrained(tmp_path / "other")
    code, _, err = run_cli("align", d["A"], tmp_path / "other", tmp_path / "o2")
    assert code != 0 and "not the same architecture" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def _ids_file(tmp_path):
    from safetensors.torch import save_file

    ids = torch.randint(0, 64, (48, 12), generator=torch.Generator().manual_seed(3))
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    return tmp_path / "ids.safetensors"


def test_activation_matching_from_files_recovers_a(run_cli, tmp_path, family):
    from safetensors.torch import load_file

    _, d = family
    ids = _ids_file(tmp_path)
    code, out, err = run_cli(
        "align", d["A"], d["P"], tmp_path / "out", "--method", "activation", "--data", ids, "-q"
    )
    assert code == 0, out + err
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(d["A"] / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    prov = json.loads((tmp_path / "out" / "brickwork.json").read_text())
    assert prov["alignment"]["method"] == "activation"


def test_recipe_align_feeds_permuted_modules_to_a_data_aware_merge(run_cli, tmp_path, family):
    """RegMean of A and a permuted copy of A: A itself once the copy is aligned (identical
    models), not A without align: (the data-aware path loads the permuted module)."""
    from safetensors.torch import load_file

    _, d = family
    data = {"path": str(_ids_file(tmp_path)), "n_examples": 48, "batch_size": 16}
    models = [{"model": str(d["A"]), "data": data}, {"model": str(d["P"]), "data": data}]
    recipe = {"method": "regmean", "models": models, "align": {"to": str(d["A"])}}
    code, out, err = run_cli("merge", write_yaml(tmp_path / "r.yaml", recipe), tmp_path / "o", "-q")
    assert code == 0, out + err
    a = load_file(d["A"] / "model.safetensors")
    got = load_file(tmp_path / "o" / "model.safetensors")
    assert all(torch.allclose(got[k], a[k], atol=1e-4) for k in a)
    del recipe["align"]
    code, out, err = run_cli("merge", write_yaml(tmp_path / "n.yaml", recipe), tmp_path / "n", "-q")
    assert code == 0, out + err
    naive = load_file(tmp_path / "n" / "model.safetensors")
    assert not all(torch.allclose(naive[k], a[k], atol=1e-3) for k in a)


def test_recipe_align_activation_needs_data():
    from brickwork.errors import RecipeError
    from brickwork.recipe import parse_recipe

    with pytest.raises(RecipeError, match="align.data"):
        parse_recipe(
            {
                "method": "linear",
                "models": [{"model": "a"}, {"model": "b"}],
                "align": {"to": "a", "method": "activation"},
            }
        )
