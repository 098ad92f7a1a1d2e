"""compute_dtype: bfloat16 / float16 / input arithmetic, written out plainly in mergekit's
order of operations (mergekit itself is not a dependency), and how a mergekit recipe's
``dtype:`` maps to brickwork's compute dtype."""

from __future__ import annotations

import pytest
import torch

from brickwork.errors import RecipeError
from brickwork.merge.api import merge_state_dicts
from brickwork.recipe import parse_recipe

BF16 = torch.bfloat16


def _bf16_family(shape=(16, 24), n=3):
    """A bfloat16 base and ``n`` fine-tunes whose deltas are not representable exactly in
    bfloat16 at the weights' scale, so every rounding step shows."""
    g = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(shape, generator=g)).to(BF16)
    fts = [(base.float() + 0.002 * torch.randn(shape, generator=g)).to(BF16) for _ in range(n)]
    return base, fts


def _merge(method, base, fts, compute_dtype, weights=None, **params):
    mp = [{"weight": w} for w in weights] if weights is not None else None
    return merge_state_dicts(
        method,
        [{"w": t} for t in fts],
        base={"w": base} if base is not None else None,
        parameters=params,
        model_parameters=mp,
        compute_dtype=compute_dtype,
    )["w"]


def test_task_arithmetic_in_bfloat16_follows_mergekit_order():
    base, fts = _bf16_family()
    w, lam = [0.5, 0.3, 0.2], 0.9
    # mergekit: each delta rounded to bf16, times its weight (the weight itself a bf16
    # number), the weighted deltas summed (torch's bf16 sum accumulates in float32 and rounds
    # once), times lambda, plus the base — every step a bfloat16 tensor.
    wb = [torch.tensor(x, dtype=BF16) for x in w]
    weighted = [(t - base) * wi for t, wi in zip(fts, wb)]
    mixed = (weighted[0].float() + weighted[1].float() + weighted[2].float()).to(BF16)
    expected = base + mixed * lam
    out = _merge("task_arithmetic", base, fts, "bfloat16", weights=w, **{"lambda": lam})
    assert out.dtype == BF16
    assert torch.equal(out, expected)
    # and it is not what float32 arithmetic gives: the test sees the rounding
    f32 = _merge("task_arithmetic", base, fts, "float32", weights=w, **{"lambda": lam})
    assert not torch.equal(out, f32)


def test_ties_in_bfloat16_follows_mergekit_order():
    base, fts = _bf16_family()
    w, density = [1.0, 0.7, 0.5], 0.5
    wb = [torch.tensor(x, dtype=BF16) for x in w]
    trimmed = []
    for t in fts:
        d = t - base  # bf16
        mag = d.abs().float().reshape(-1)
        k = int(density * mag.numel())
        keep = torch.zeros_like(mag, dtype=torch.bool)
        keep[torch.argsort(mag, descending=True, stable=True)[:k]] = True
        trimmed.append(d * keep.reshape(d.shape))
    weighted = [d * wi for d, wi in zip(trimmed, wb)]
    total = (weighted[0].float() + weighted[1].float() + weighted[2].float()).to(BF16)
    elected = torch.where(total >= 0, 1.0, -1.0).to(BF16)
    agree = [d.sign() == elected for d in weighted]
    mixed = sum(d.float() * a for d, a in zip(weighted, agree)).to(BF16)
    divisor = sum(wi.float() * a for wi, a in zip(wb, agree)).to(BF16)
    divisor[divisor == 0] = 1
    expected = base + mixed / divisor
    out = _merge("ties", base, fts, "bfloat16", weights=w, density=density)
    # ties at the trim threshold may be broken differently: compare elsewhere
    at_tie = torch.zeros(base.shape, dtype=torch.bool)
    for t in fts:
        mag = (t - base).abs().float()
        thr = mag.reshape(-1).topk(int(density * mag.numel())).values.min()
        at_tie |= mag == thr
    assert out.dtype == BF16
    assert torch.equal(out[~at_tie], expected[~at_tie])


def test_linear_and_slerp_accumulate_in_float32_and_round_once():
    base, fts = _bf16_family()
    w = [0.5, 0.3, 0.2]
    lin = _merge("linear", None, fts, "bfloat16", weights=w)
    # float32 weights; each w_i θ_i added with one fused multiply-add (mergekit's addcmul_:
    # `acc + θ_i * w_i` in two steps differs in the last bit of some entries), then / Σ w_i
    wf = torch.tensor(w)
    acc = torch.zeros(base.shape)
    for t, wi in zip(fts, wf):
        acc.addcmul_(t.float(), wi)
    expected = acc / wf.sum()
    assert lin.dtype == BF16
    assert torch.equal(lin, expected.to(BF16))
    sl16 = _merge("slerp", base, fts[:1], "bfloat16", t=0.3)
    sl32 = _merge("slerp", base, fts[:1], "float32", t=0.3)  # inputs upcast exactly
    assert torch.equal(sl16, sl32.to(BF16))


def test_input_compute_dtype_is_each_tensors_own():
    base, fts = _bf16_family()
    a = _merge("task_arithmetic", base, fts, "input")
    b = _merge("task_arithmetic", base, fts, "bfloat16")
    assert a.dtype == BF16 and torch.equal(a, b)


def test_float16_compute():
    base, fts = _bf16_family()
    base, fts = base.half(), [t.half() for t in fts]
    out = _merge("task_arithmetic", base, fts, "float16")
    expected = (
        base + ((fts[0] - base).float() + (fts[1] - base).float() + (fts[2] - base).float()).half()
    )
    assert out.dtype == torch.float16 and torch.equal(out, expected)


def test_unknown_compute_dtype_is_refused():
    with pytest.raises(RecipeError, match="compute_dtype"):
        parse_recipe({"method": "linear", "models": [{"model": "a"}], "compute_dtype": "int8"})


# -- mergekit recipes ---------------------------------------------------------------------------


def _mk(**kw):
    return parse_recipe(
        {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "a"}], **kw}
    )


def test_mergekit_dtype_is_the_compute_dtype():
    assert _mk(dtype="bfloat16").compute_dtype == "bfloat16"
    assert _mk(dtype="float16", out_dtype="float32").compute_dtype == "float16"
    assert _mk(dtype="float32", out_dtype="bfloat16").compute_dtype == "float32"
    assert _mk(dtype="torch.bfloat16").compute_dtype == "bfloat16"
    assert _mk().compute_dtype == "input"  # mergekit computes in what it loads
    assert parse_recipe({"method": "linear", "models": [{"model": "a"}]}).compute_dtype == (
        "float32"
    )
    with pytest.raises(RecipeError, match="dtype 'int4'"):
        _mk(dtype="int4", out_dtype="bfloat16")


# -- the command ----------------------------------------------------------------------------------


def _load_dir(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_cli_compute_dtype_and_mergekit_bfloat16_recipe(run_cli, tmp_path, llama_family):
    import yaml
    from _helpers import write_yaml

    fam = llama_family
    models = [{"model": str(fam.ft1), "parameters": {"weight": 0.7}}]
    models.append({"model": str(fam.ft2), "parameters": {"weight": 0.3}})
    native = write_yaml(
        tmp_path / "bw.yaml", {"method": "task_arithmetic", "base": str(fam.base), "models": models}
    )
    code, _, err = run_cli("merge", native, tmp_path / "a", "-q", "--compute-dtype", "bfloat16")
    assert code == 0, err
    recorded = yaml.safe_load((tmp_path / "a" / "brickwork_recipe.yaml").read_text())
    assert recorded["compute_dtype"] == "bfloat16"
    got = _load_dir(tmp_path / "a")
    base, ft1, ft2 = (_load_dir(p) for p in (fam.base, fam.ft1, fam.ft2))
    expected = merge_state_dicts(
        "task_arithmetic",
        [ft1, ft2],
        base=base,
        model_parameters=[{"weight": 0.7}, {"weight": 0.3}],
        compute_dtype="bfloat16",
    )
    name = "model.layers.0.mlp.up_proj.weight"
    assert got[name].dtype == base[name].dtype == torch.float32  # computed in bf16, written f32
    assert torch.equal(got[name], expected[name].float())
    assert torch.equal(got[name], got[name].to(BF16).float())  # bf16 values
    # a mergekit recipe with dtype: bfloat16 computes the same way
    mk = write_yaml(
        tmp_path / "mk.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(fam.base),
            "models": models,
            "dtype": "bfloat16",
            "out_dtype": "float32",
        },
    )
    code, _, err = run_cli("merge", mk, tmp_path / "b", "-q")
    assert code == 0, err
    assert torch.equal(_load_dir(tmp_path / "b")[name], got[name])
    code, _, err = run_cli("merge", native, tmp_path / "c", "-q", "--compute-dtype", "int3")
    assert code == 2 and "compute_dtype" in err and not (tmp_path / "c").exists()
