"""Hypothesis strategies for the recipe fuzz tests (tests/test_fuzz_recipes.py) and the tiny
checkpoints they point at. Import as ``from _fuzz import ...``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors.torch import save_file

from brickwork.merge.registry import get_method, list_methods

# -- tiny checkpoints -------------------------------------------------------------------------

HIDDEN, VOCAB, LAYERS = 4, 8, 2


def _llama_like(seed: int, *, wide: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    sd = {"model.embed_tokens.weight": r(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = r(HIDDEN)
        sd[f"{p}.self_attn.q_proj.weight"] = r(HIDDEN, HIDDEN)
        sd[f"{p}.mlp.up_proj.weight"] = r(2 * HIDDEN + (1 if wide and i == 1 else 0), HIDDEN)
        sd[f"{p}.mlp.down_proj.weight"] = r(HIDDEN, 2 * HIDDEN)
    sd["model.norm.weight"] = r(HIDDEN)
    sd["lm_head.weight"] = r(VOCAB, HIDDEN)
    return sd


def _save(d: Path, sd: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    d.mkdir()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def make_zoo(root: Path) -> dict[str, Path]:
    """A base and two fine-tunes of a tiny Llama-shaped checkpoint in ``root``, plus things
    that exist but are no compatible checkpoint."""
    cfg = {"model_type": "llama", "num_hidden_layers": LAYERS, "torch_dtype": "float32"}
    base = _llama_like(0)
    z = {"base": _save(root / "base", base, cfg)}
    for k, seed in (("ft1", 1), ("ft2", 2)):
        z[k] = _save(root / k, {n: t + 0.01 * _llama_like(seed)[n] for n, t in base.items()}, cfg)
    z["wide"] = _save(root / "wide", _llama_like(3, wide=True), cfg)
    z["mlp"] = _save(
        root / "mlp", {"net.0.weight": torch.ones(3, 2), "net.2.weight": torch.ones(1, 3)}
    )
    z["fp16"] = _save(root / "fp16", {n: t.half() for n, t in base.items()}, cfg)
    (root / "empty").mkdir()
    z["empty"] = root / "empty"
    z["notes"] = root / "notes.txt"
    z["notes"].write_text("not a checkpoint\n")
    z["junk"] = root / "junk.safetensors"
    z["junk"].write_bytes(bytes(range(256)) * 4)
    z["binary"] = root / "binary.txt"
    z["binary"].write_bytes(b"\xff\xfe\x00\x9c junk \x80\x81")
    (root / "hfdir").mkdir()
    (root / "hfdir" / "config.json").write_text(json.dumps(cfg))
    z["hfdir"] = root / "hfdir"
    z["blank"] = root / "blank.txt"
    z["blank"].write_text("\n \n")
    z["missing"] = root / "no_such_model"
    return z


# -- strategies -------------------------------------------------------------------------------

METHODS = list_methods()
PARAM_NAMES = sorted({p.name for m in METHODS for p in get_method(m).params})
EXISTING = ["base", "ft1", "ft2", "wide", "mlp", "fp16", "empty", "notes", "junk", "binary"]
text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
finite = st.floats(-2, 2, allow_nan=False)
odd = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -1.0, 0.0, 1.5, 2**70])
scalar = st.one_of(st.booleans(), st.integers(-3, 3), finite, odd, text)
junk = st.recursive(
    st.one_of(st.none(), scalar),
    lambda c: st.one_of(
        st.lists(c, max_size=3), st.dictionaries(st.one_of(text, st.integers(0, 3)), c, max_size=3)
    ),
    max_leaves=6,
)


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy = junk) -> st.SearchStrategy:
    """``good`` about three times in four, else ``bad``."""
    return st.one_of(good, good, good, bad)


def with_extra(d: st.SearchStrategy, keys: list[str]) -> st.SearchStrategy:
    """Sometimes one more key: a misspelling, a key of another level, or random text."""
    extra = st.dictionaries(st.one_of(st.sampled_from(keys), text), junk, max_size=1)
    return st.tuples(d, st.one_of(st.just({}), st.just({}), extra)).map(lambda t: {**t[0], **t[1]})


def recipes(paths: st.SearchStrategy) -> st.SearchStrategy:
    """Recipes of both forms, mostly plausible, often wrong somewhere."""
    gradient = st.lists(mostly(finite, scalar), max_size=4)
    condition = with_extra(
        st.fixed_dictionaries(
            {"value": mostly(st.one_of(finite, gradient))},
            optional={"filter": mostly(st.sampled_from(["self_attn", "mlp", "layers.1", "*"]))},
        ),
        ["fliter", "values", "weight"],
    )
    setting = st.one_of(finite, odd, gradient, condition, st.lists(condition, max_size=3), junk)
    names = st.sampled_from([*PARAM_NAMES, "wieght", "densty", "lamda", "Weight", "parameters"])
    params = st.one_of(
        st.just({}), st.dictionaries(st.one_of(names, text), setting, max_size=3), junk
    )
    entry = mostly(
        with_extra(
            st.fixed_dictionaries({"model": paths}, optional={"parameters": params}),
            ["paramters", "weight", "layer_range", "base_model"],
        )
    )
    layer_range = mostly(st.tuples(st.integers(0, 3), st.integers(0, 4)).map(list))
    source = mostly(
        with_extra(
            st.fixed_dictionaries(
                {"model": paths, "layer_range": layer_range}, optional={"parameters": params}
            ),
            ["layer_ranges", "layers", "sources"],
        )
    )
    slice_ = mostly(
        with_extra(
            st.fixed_dictionaries(
                {"sources": mostly(st.lists(source, max_size=3))},
                optional={"base_model": mostly(paths), "parameters": params},
            ),
            ["source", "models", "base"],
        )
    )
    body = st.one_of(
        st.fixed_dictionaries({"models": mostly(st.lists(entry, max_size=3))}),
        st.fixed_dictionaries({"slices": mostly(st.lists(slice_, max_size=2))}),
        st.fixed_dictionaries({}, optional={"models": junk, "slices": junk}),
    )
    method = mostly(st.sampled_from(METHODS), st.sampled_from(["tie", "Linear", "", "average"]))
    dtypes = ["float32", "float16", "bfloat16", "float64", "bf16", "fp16", "int8", "half"]
    native = st.fixed_dictionaries(
        {"method": method},
        optional={
            "base": mostly(paths),
            "parameters": params,
            "dtype": mostly(st.sampled_from(dtypes)),
            "compute_dtype": mostly(st.sampled_from(["float32", "float64", "float16"])),
            "seed": mostly(st.integers(-(2**70), 2**70)),
            "on_missing": mostly(st.sampled_from(["error", "base", "skip", "ignore"])),
        },
    )
    mergekit = st.fixed_dictionaries(
        {"merge_method": method},
        optional={
            "base_model": mostly(paths),
            "parameters": params,
            "dtype": mostly(st.sampled_from(dtypes)),
            "out_dtype": mostly(st.sampled_from(dtypes)),
            "tokenizer_source": st.one_of(st.just("base"), paths, junk),
            "tokenizer": junk,
            "chat_template": junk,
            "modules": junk,
        },
    )
    keys = ["paramters", "dtyp", "models", "merge_method", "method", "base", "base_model"]
    return st.one_of(
        with_extra(st.tuples(native, body).map(lambda t: {**t[0], **t[1]}), keys),
        with_extra(st.tuples(mergekit, body).map(lambda t: {**t[0], **t[1]}), keys),
        junk,
    )


def zoo_paths(zoo: dict[str, Path]) -> st.SearchStrategy:
    named = st.sampled_from([str(zoo[k]) for k in EXISTING + ["missing"]])
    odd_paths = st.sampled_from(["", ".", "org/model", "~/nope", str(zoo["missing"]) + "/x" * 3])
    return st.one_of(named, named, named, odd_paths, text)


# Valid values per parameter name (bools: true/false); a valid recipe is drawn first and then
# mutated a little, so that the fuzz reaches the checks past parsing (paths, checkpoints,
# shapes, planning, merging) and sometimes succeeds.
VALID = {
    "weight": st.floats(-1, 2),
    "density": st.floats(0.1, 1),
    "gamma": st.floats(0, 0.5),
    "epsilon": st.floats(0, 0.3),
    "lambda": st.floats(-1, 2),
    "t": st.floats(0, 1),
    "scale": st.floats(-2, 2),
    "max_iter": st.integers(1, 3),
    "tol": st.floats(1e-6, 1e-2),
}


def _setting(draw, name: str):
    value = VALID.get(name, st.booleans())
    forms = [value]
    if name in VALID:
        forms.append(st.lists(value, min_size=1, max_size=3))  # a gradient over layers
        cond = st.fixed_dictionaries(
            {"filter": st.sampled_from(["self_attn", "mlp", "layers.1", "norm"]), "value": value}
        )
        forms.append(st.tuples(st.lists(cond, max_size=2), value).map(
            lambda t: [*t[0], {"value": t[1]}]
        ))  # fmt: skip
    return draw(st.one_of(forms))


def _params(draw, specs) -> dict:
    chosen = draw(st.lists(st.sampled_from(specs), unique_by=lambda p: p.name)) if specs else []
    return {p.name: _setting(draw, p.name) for p in chosen}


@st.composite
def valid_recipes(draw, zoo: dict[str, Path]) -> dict:
    m = get_method(draw(st.sampled_from(METHODS)))
    use_base = m.needs_base or (m.base == "optional" and draw(st.booleans()))
    base = str(zoo["base"]) if use_base else None
    r: dict = {"method": m.name}
    if draw(st.integers(0, 3)) == 0:  # slices: the same layer range of every source
        a = draw(st.integers(0, LAYERS - 1))
        b = draw(st.integers(a + 1, LAYERS))
        keys = draw(st.lists(st.sampled_from(["ft1", "ft2"]), min_size=1, max_size=2, unique=True))
        keys = (["base"] if base else []) + keys
        sources = [{"model": str(zoo[k]), "layer_range": [a, b]} for k in keys]
        r["slices"] = [{"sources": sources}]
    else:
        keys = draw(
            st.lists(st.sampled_from(["ft1", "ft2", "fp16"]), min_size=1, max_size=3, unique=True)
        )
        r["models"] = [
            {"model": str(zoo[k]), "parameters": _params(draw, m.per_model_params)} for k in keys
        ]
    if base:
        r["base"] = base
    r["parameters"] = _params(draw, list(m.params))
    if draw(st.booleans()):
        r["dtype"] = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    if draw(st.booleans()):  # mergekit's spelling of the same recipe
        r = {{"method": "merge_method", "base": "base_model"}.get(k, k): v for k, v in r.items()}
    elif draw(st.booleans()):
        r["seed"] = draw(st.integers(-5, 2**64))
        r["on_missing"] = draw(st.sampled_from(["error", "base", "skip"]))
    return r


def _positions(x, out=None) -> list:
    """Every (container, key) in the nested recipe ``x``."""
    out = [] if out is None else out
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        out.append((x, k))
        _positions(v, out)
    return out


def _misspell(draw, key: str) -> str:
    i = draw(st.integers(0, max(0, len(key) - 1)))
    return draw(
        st.sampled_from(
            [key[:i] + key[i + 1 :], key[:i] + key[i : i + 1] * 2 + key[i + 1 :], key.title()]
        ).filter(lambda k: k != key)
    )


@st.composite
def mutated_recipes(draw, zoo: dict[str, Path]) -> dict:
    """A valid recipe with zero, one or two mistakes anywhere in it."""
    r = draw(valid_recipes(zoo))
    paths = zoo_paths(zoo)
    bad_values = st.one_of(
        odd, st.sampled_from([-1, 0, 1.5, 2, "0.5", "yes", True, None, [], {}, [[0, 1]]]), junk
    )
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
        positions = _positions(r)
        op = draw(st.sampled_from(["value", "value", "path", "delete", "add", "rename"]))
        if op == "path":  # another model: one that exists but does not fit, or none
            positions = [(c, k) for c, k in positions if k in ("model", "base", "base_model")]
        container, key = draw(st.sampled_from([(None, None), *positions]))
        if container is None:  # the recipe itself
            if op in ("add", "rename"):
                r[
                    draw(
                        st.sampled_from(
                            ["paramters", "dtyp", "model", "slices", "models", "base_model"]
                        )
                    )
                ] = draw(junk)
            continue
        if op == "value":
            container[key] = draw(bad_values)
        elif op == "path":
            container[key] = draw(paths)
        elif op == "delete":
            del container[key]
        elif isinstance(container, dict) and op == "add":
            container[draw(st.one_of(text, st.sampled_from(PARAM_NAMES)))] = draw(bad_values)
        elif isinstance(container, dict) and isinstance(key, str) and key:
            container[_misspell(draw, key)] = container.pop(key)
    return r


def any_recipe(zoo: dict[str, Path]) -> st.SearchStrategy:
    return st.one_of(mutated_recipes(zoo), mutated_recipes(zoo), recipes(zoo_paths(zoo)))


BAD_YAML = [
    "method: linear\nmodels: [a, b\n",
    "a: b: c",
    "{{{",
    "method: linear\n\tmodels: []",
    "!!python/object/apply:os.system ['true']",
    "method: *nope",
    "method: linear\nmethod: ties\n",
    "- [",
    "---\n---\nmethod: linear\n",
    "? [a, b]\n: c\n",
    "method: linear\nmodels:\n  - model: x\n  - {model: y\n",
    "%YAML 9.9\n---\na: 1",
]


# -- route upcycle / moefy recipes ------------------------------------------------------------


def upcycle_recipes(zoo: dict[str, Path]) -> st.SearchStrategy:
    # Only paths that fail before a model is loaded: the fuzz stays cheap.
    model = mostly(st.sampled_from([str(zoo["missing"]), "org/model", str(zoo["notes"] / "x")]))
    files = mostly(
        st.sampled_from([str(zoo[k]) for k in ("notes", "binary", "blank", "missing", "empty")])
    )
    prompts = mostly(st.lists(st.one_of(st.sampled_from(["solve 3x", " ", ""]), text), max_size=2))
    expert = mostly(
        with_extra(
            st.fixed_dictionaries(
                {"model": model},
                optional={
                    "positive_prompts": prompts,
                    "negative_prompts": prompts,
                    "examples": prompts,
                    "examples_file": files,
                },
            ),
            ["source_model", "prompts", "example"],
        )
    )
    mk_expert = mostly(
        with_extra(
            st.fixed_dictionaries(
                {"source_model": model},
                optional={
                    "positive_prompts": prompts,
                    "negative_prompts": prompts,
                    "noise_scale": junk,
                },
            ),
            ["model", "positive_prompt"],
        )
    )
    router_train = mostly(
        with_extra(
            st.fixed_dictionaries(
                {},
                optional={
                    "init": mostly(st.sampled_from(["task", "random", "hidden"])),
                    "steps": mostly(st.integers(-1, 3)),
                    "lr": mostly(st.one_of(finite, odd)),
                    "texts": prompts,
                    "texts_file": files,
                },
            ),
            ["step", "texts_files"],
        )
    )
    native = st.fixed_dictionaries(
        {"base": model, "experts": mostly(st.lists(expert, max_size=3))},
        optional={
            "shared_expert": mostly(st.fixed_dictionaries({"model": model})),
            "format": mostly(st.sampled_from(["auto", "mixtral", "qwen2_moe", "brickwork", "moe"])),
            "top_k": mostly(st.integers(-1, 4)),
            "merge_method": mostly(st.sampled_from([*METHODS[:4], "tie"])),
            "merge_parameters": mostly(
                st.dictionaries(st.sampled_from(PARAM_NAMES), scalar, max_size=2)
            ),
            "router_init": mostly(
                st.sampled_from(["random", "hidden", "cheap_embed", "task", "train", "rand"])
            ),
            "router_std": mostly(st.one_of(finite, odd)),
            "router_scale": mostly(st.one_of(finite, odd)),
            "router_train": router_train,
            "max_length": mostly(st.integers(-1, 300)),
            "dtype": mostly(st.sampled_from(["bfloat16", "bf16", "float64"])),
        },
    )
    mergekit = st.fixed_dictionaries(
        {"base_model": model, "experts": mostly(st.lists(mk_expert, max_size=3))},
        optional={
            "gate_mode": mostly(
                st.sampled_from(["hidden", "cheap_embed", "random", "uniform_random", "hiden"])
            ),
            "experts_per_token": mostly(st.integers(-1, 4)),
            "shared_experts": mostly(st.lists(mk_expert, max_size=2)),
            "architecture": mostly(st.sampled_from(["mixtral", "qwen", "llama"])),
            "dtype": mostly(st.sampled_from(["bf16", "float16", "int8"])),
        },
    )
    keys = ["experts_per_token", "bases", "expert", "gate", "top-k"]
    return st.one_of(with_extra(native, keys), with_extra(mergekit, keys), junk)


def moefy_recipes(zoo: dict[str, Path]) -> st.SearchStrategy:
    # Calibration text that cannot be read, so that no tokenizer or model is ever loaded.
    model = mostly(st.sampled_from([str(zoo[k]) for k in ("missing", "empty", "notes", "hfdir")]))
    calib = mostly(
        with_extra(
            st.fixed_dictionaries(
                {
                    "text": mostly(
                        st.sampled_from(
                            [str(zoo[k]) for k in ("binary", "blank", "missing", "empty")]
                        )
                    )
                },
                optional={
                    "lines": mostly(st.integers(-1, 4)),
                    "max_length": mostly(st.integers(0, 4)),
                    "batch_size": mostly(st.integers(0, 4)),
                },
            ),
            ["line", "texts", "batchsize"],
        )
    )
    recipe = st.fixed_dictionaries(
        {
            "model": model,
            "n_experts": mostly(st.integers(-1, 8)),
            "top_k": mostly(st.integers(-1, 8)),
            "calibration": calib,
        },
        optional={
            "clustering": mostly(st.sampled_from(["kmeans", "coactivation", "k-means"])),
            "router": mostly(st.sampled_from(["linear", "mlp", "lstm"])),
            "router_hidden": mostly(st.integers(-1, 8)),
            "steps": mostly(st.integers(-1, 3)),
            "lr": mostly(st.one_of(finite, odd)),
            "max_tokens": mostly(st.integers(0, 64)),
            "ffns": mostly(st.lists(text, max_size=2)),
            "seed": mostly(st.integers()),
        },
    )
    return st.one_of(with_extra(recipe, ["n_expert", "topk", "calib", "models"]), junk)
