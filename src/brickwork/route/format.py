"""brickwork's own MoE format, for models that no published MoE architecture describes.

A Llama / Mistral MoE is written as a Mixtral checkpoint (``route.upcycle``); everything
else (a BERT encoder whose FFNs became :class:`~brickwork.route.moe.MoEBlock` s, a generic
PyTorch module) is written here, as a directory::

    out/
      model.safetensors      every tensor of ``model.state_dict()`` (sharded + index if large)
      brickwork.json         format version, the dense base, the replaced modules, provenance
      base_config.json       the dense base's transformers config (transformers bases only;
                             not ``config.json``, so that transformers' ``from_pretrained``
                             refuses the directory instead of loading the dense model with
                             its FFN weights missing and random)
      README.md              a short model card
      tokenizer files        copied from ``copy_from`` if given

``brickwork.json`` (no pickle anywhere)::

    {"format": "brickwork.moe", "format_version": 1,
     "base": {"kind": "transformers", "class": "BertModel", "config": "base_config.json"}
          or {"kind": "module", "class": "mypkg.MyNet"},      # informational only
     "moe": [{"path": "encoder.layer.0.intermediate", "layer": {MoELayer kwargs}}, ...],
     "identity": ["encoder.layer.0.output.dense", ...],
     "kind": ..., "settings": ..., "inputs": ..., "environment": ...}  # provenance

How an FFN is replaced: the module that receives the FFN input becomes a ``MoEBlock``
computing the *whole* FFN (up, activation, down, output bias), and modules that used to
finish the FFN after it become ``nn.Identity``. For an HF BERT layer that is
``layer.intermediate`` -> ``MoEBlock`` and ``layer.output.dense`` -> ``nn.Identity``, so
``BertOutput`` still applies dropout and ``LayerNorm(x + residual)`` to the MoE's output;
for a Llama-style ``mlp`` or an ``nn.Sequential(Linear, act, Linear)`` the module itself
becomes the ``MoEBlock`` and nothing becomes ``nn.Identity``.

``load`` rebuilds the dense skeleton (a transformers class from ``base_config.json``, never
downloading; or the ``base`` module the caller passes, deep-copied), replaces the same
modules and loads every tensor strictly. Example::

    import brickwork
    from brickwork.route import MoEBlock, MoELayer, save_moe

    model = transformers.BertModel(config)                      # the dense model
    layer = model.encoder.layer[0]
    moe = MoELayer(768, 768, 4, top_k=2, activation="gelu")     # experts: 4 FFNs
    ...                                                         # fill its weights
    layer.intermediate = MoEBlock(moe)
    layer.output.dense = torch.nn.Identity()
    save_moe(model, "out/bert-moe")
    same = brickwork.load("out/bert-moe")                       # a BertModel with MoEs

    net = MyNet(); ...; save_moe(moefied_net, "out/net-moe")    # generic module:
    same = brickwork.load("out/net-moe", base=MyNet())          # pass the dense skeleton
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.reader import TensorInfo
from ..checkpoint.writer import CheckpointWriter
from ..errors import CheckpointError, OutputExistsError, did_you_mean
from .moe import MoEBlock, MoELayer

FORMAT = "brickwork.moe"
FORMAT_VERSION = 1
META = "brickwork.json"
BASE_CONFIG = "base_config.json"


# -- module surgery ------------------------------------------------------------------------
def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root``'s submodule at dotted ``path`` (``""`` is ``root``); errors list near paths."""
    if path == "":
        return root
    names = dict(root.named_modules())
    if path not in names:
        near = did_you_mean(path, [n for n in names if n])
        raise CheckpointError(
            f"module path '{path}' does not exist in {type(root).__name__}.{near} "
            "Give a path from model.named_modules()."
        )
    return names[path]


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` in ``root`` (in place); returns the root (``new`` if path is "")."""
    if path == "":
        return new
    parent_path, _, name = path.rpartition(".")
    get_module(root, path)  # a missing path raises with the nearest valid ones
    setattr(get_module(root, parent_path), name, new)
    return root


# -- saving ---------------------------------------------------------------------------------
def _base_description(model: nn.Module, base_config: Any) -> tuple[dict[str, Any], str | None]:
    cfg = base_config if base_config is not None else getattr(model, "config", None)
    is_hf = type(model).__module__.startswith("transformers.")
    if cfg is None or not is_hf:
        cls = f"{type(model).__module__}.{type(model).__qualname__}"
        return {"kind": "module", "class": cls}, None
    text = cfg.to_json_string() if hasattr(cfg, "to_json_string") else json.dumps(dict(cfg))
    return {"kind": "transformers", "class": type(model).__name__, "config": BASE_CONFIG}, text


def _overlaps(out: Path, inputs: Iterable[str | os.PathLike]) -> None:
    o = out.expanduser().resolve()
    for src in inputs:
        p = Path(src).expanduser().resolve()
        if o == p or o in p.parents or p in o.parents:
            raise OutputExistsError(
                f"output {out} overlaps the input {p}; brickwork never writes over its inputs. "
                "Choose another output path."
            )


def save_moe(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    base_config: Any = None,
    copy_from: str | os.PathLike | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    provenance: Mapping[str, Any] | None = None,
    model_card: str | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
) -> Path:
    """Write ``model`` (with :class:`MoEBlock` s in place of FFNs) in brickwork's MoE format.

    ``base_config``: the dense architecture's transformers config (default: ``model.config``
    for a transformers model; a generic module needs ``base=`` at load time instead).
    ``copy_from``: a directory whose non-weight files (tokenizer, generation config, ...;
    not its config.json) are carried over. ``inputs``:
    paths the output must not overlap (the output never replaces an input). ``provenance``:
    extra keys for ``brickwork.json`` (``kind``, ``settings``, ``inputs`` ...). The output
    appears atomically (temp dir + rename); ``force`` replaces an existing ``out``.
    """
    out = Path(out)
    _overlaps(out, [*inputs, *([copy_from] if copy_from is not None else [])])
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, MoEBlock)}
    if not blocks:
        raise CheckpointError(
            f"save_moe: {type(model).__name__} has no MoEBlock; replace its FFN modules by "
            "MoEBlock(MoELayer(...)) first (or save a dense model with save_pretrained)."
        )
    identity = [n for n, m in model.named_modules() if isinstance(m, nn.Identity) and n]
    base, config_text = _base_description(model, base_config)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base": base,
        "moe": [{"path": n, "layer": b.moe.config()} for n, b in blocks.items()],
        "identity": identity,
    }
    return write_format(
        model, out, meta, config_text, provenance=provenance, copy_from=copy_from,
        model_card=model_card, card=_card, shard_size=shard_size, force=force,
    )  # fmt: skip


def write_format(
    model: nn.Module,
    out: Path,
    meta: dict[str, Any],
    config_text: str | None,
    *,
    provenance: Mapping[str, Any] | None,
    copy_from: str | os.PathLike | None,
    model_card: str | None,
    card: Any,
    shard_size: str | int,
    force: bool,
) -> Path:
    """Write a brickwork-format directory (the MoE and the low-rank formats): ``model``'s
    tensors, ``base_config.json``, ``brickwork.json`` (``meta`` plus ``provenance`` keys it
    does not set, and the environment) and a model card (``model_card``, else
    ``card(meta)``), atomically through the shared writer."""
    from ..checkpoint.provenance import environment

    meta.update({k: v for k, v in (provenance or {}).items() if k not in meta})
    meta.setdefault("environment", environment())
    sd = model.state_dict()
    infos = [TensorInfo(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    with CheckpointWriter(
        out,
        infos,
        shard_size=shard_size,
        force=force,
        side_files=copy_from,
        exclude=_NOT_COPIED,
    ) as w:
        for k, v in sd.items():
            w.write(k, v.contiguous())
        if config_text is not None:
            w.add_text(BASE_CONFIG, config_text.rstrip("\n") + "\n")
        w.add_text(META, json.dumps(meta, indent=2) + "\n")
        w.add_text("README.md", model_card or card(meta))
    return out


#: Side files of ``copy_from`` that are not carried over: the dense model's config.json is
#: written as base_config.json, so transformers does not load the MoE as a dense model.
_NOT_COPIED = ("config.json",)


def _card(meta: Mapping[str, Any]) -> str:
    layers = meta["moe"]
    first = layers[0]["layer"]
    return (
        "---\ntags: [moe, brickwork]\n---\n# Mixture of experts (brickwork format)\n\n"
        f"Base: `{meta['base']['class']}`; {len(layers)} FFN(s) replaced by MoE layers "
        f"({first['n_experts']} experts, top-{first['top_k']}, combine {first['combine']}).\n\n"
        "Load it with:\n\n```python\nimport brickwork\nmodel = brickwork.load(PATH"
        + (", base=DENSE_MODULE" if meta["base"]["kind"] == "module" else "")
        + ")\n```\n"
    )


# -- loading --------------------------------------------------------------------------------
def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such directory; brickwork.load takes a directory written by "
            "brickwork (save_moe, `brickwork route moefy`)."
        )
    f = path / META
    if not f.is_file():
        hint = (
            " It has a config.json: load it with transformers' AutoModel*.from_pretrained."
            if (path / "config.json").is_file()
            else ""
        )
        raise CheckpointError(f"{f}: missing; this is not a brickwork model directory.{hint}")
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not readable JSON ({e}).") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        hint = (
            " It is a Hugging Face Mixtral directory: load it with "
            "transformers.AutoModelForCausalLM.from_pretrained."
            if fmt == "mixtral"
            else ""
        )
        raise CheckpointError(f"{f}: field 'format' is {fmt!r}, expected '{FORMAT}'.{hint}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{f}: field 'format_version' is {meta.get('format_version')!r}; this brickwork "
            f"reads version {FORMAT_VERSION}. Upgrade brickwork to load it."
        )
    for key, kind in (("base", dict), ("moe", list), ("identity", list)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(
                f"{f}: field '{key}' is {type(meta.get(key)).__name__}, expected a "
                f"{kind.__name__}. The file is damaged; write the model again."
            )
    return meta


def _skeleton(path: Path, meta: Mapping[str, Any], base: nn.Module | None) -> nn.Module:
    if base is not None:
        return copy.deepcopy(base)
    b = meta["base"]
    if b.get("kind") != "transformers":
        raise CheckpointError(
            f"{path / META}: the base is a generic module ({b.get('class')}), which the file "
            "cannot rebuild; pass the dense model: brickwork.load(path, base=module)."
        )
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            f"{path}: the base is a transformers model; install transformers "
            "(pip install 'brickwork[hf]')."
        ) from None
    name = str(b.get("class"))
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"{path / META}: base class '{name}' is not a transformers model class in "
            f"transformers {transformers.__version__}; expected e.g. BertModel."
        )
    cfg_file = path / str(b.get("config", BASE_CONFIG))
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing; the transformers base needs its config.")
    try:
        config = cls.config_class.from_json_file(str(cfg_file))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"{cfg_file}: not a readable {cls.config_class.__name__} ({e})."
        ) from None
    return cls(config).eval()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        raise CheckpointError(f"{path}: no model.safetensors (or sharded index) found.")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f}: not a readable safetensors file ({e}).") from None
    return sd


def _format_field(path: Path) -> Any:
    """``brickwork.json``'s ``format``, or ``None`` when there is no readable one."""
    try:
        return json.loads((path / META).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def load(path: str | os.PathLike, *, base: nn.Module | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save_moe` (or ``brickwork route moefy``), in eval mode.

    transformers bases are rebuilt from the directory's ``base_config.json`` (nothing is
    downloaded); a generic module needs ``base``, the dense skeleton (deep-copied, not
    changed). Every tensor is loaded strictly: a missing, unexpected or misshapen tensor is
    a :class:`~brickwork.errors.CheckpointError` naming it.
    """
    path = Path(path).expanduser()
    if _format_field(path) == "brickwork.lowrank":  # `brickwork compress lowrank` (issue 12)
        from ..compress.lowrank_format import load_lowrank

        return load_lowrank(path, base=base)
    if _format_field(path) == "brickwork.heads":  # BERT / GPT-2 with heads pruned (issue 12)
        from ..compress.structured_heads import load_structured

        return load_structured(path)
    meta = _read_meta(path)
    model = _skeleton(path, meta, base)
    f = path / META
    for i, entry in enumerate(meta["moe"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("layer"), dict)):
            raise CheckpointError(f"{f}: moe[{i}] needs 'path' and 'layer'; the file is damaged.")
        try:
            layer = MoELayer(**entry["layer"])
        except TypeError as e:
            raise CheckpointError(f"{f}: moe[{i}].layer: {e}.") from None
        model = replace_module(model, str(entry.get("path", "")), MoEBlock(layer))
    for p in meta["identity"]:
        if not isinstance(get_module(model, p), nn.Identity):
            model = replace_module(model, p, nn.Identity())
    sd = _read_weights(path)
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        detail = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"{path}: a tensor does not fit the rebuilt {type(model).__name__}: {detail}. "
            "Is `base` the right model?"
        ) from None
    problems = [f"missing tensor '{k}'" for k in res.missing_keys[:5]]
    problems += [f"unexpected tensor '{k}'" for k in res.unexpected_keys[:5]]
    if problems:
        raise CheckpointError(
            f"{path}: the weights do not match the rebuilt {type(model).__name__}: "
            + "; ".join(problems)
            + ". Was it written by another brickwork version, or is `base` the wrong model?"
        )
    return model.eval()
