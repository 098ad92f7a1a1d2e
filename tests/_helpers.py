"""Plain helpers shared by test files (import as ``from _helpers import ...``)."""

from __future__ import annotations

from pathlib import Path


def write_yaml(path: Path, data: dict | str) -> Path:
    import yaml

    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def leftovers(out: Path) -> list[str]:
    """Anything brickwork may have left next to ``out``: the output itself or temp dirs."""
    parent = out.parent
    if not parent.exists():
        return []
    return sorted(
        p.name for p in parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")
    )


#: Config keywords of the tiny random Llama / Mistral / Qwen2 models the route tests build.
TINY_LM = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def copies_of(ffn, moe) -> None:
    """Make every expert of the MoELayer ``moe`` a copy of the FFN ``ffn`` (in place)."""
    import torch

    with torch.no_grad():
        moe.gate_up.copy_(ffn.w_in.weight.expand_as(moe.gate_up))
        moe.down.copy_(ffn.w_out.weight.expand_as(moe.down))
        if moe.b_in is not None:
            moe.b_in.copy_(ffn.w_in.bias.expand_as(moe.b_in))
            moe.b_out.copy_(ffn.w_out.bias.expand_as(moe.b_out))


def permuted_copy(model, seed: int):
    """``(copy of model with every group of its fx permutation spec randomly permuted (seeded),
    {group: perm})`` for the align tests."""
    import copy

    import torch

    from brickwork.align.spec import apply_permutations, permutation_spec

    spec = permutation_spec(model)
    g = torch.Generator().manual_seed(seed)
    perms = {group.name: torch.randperm(group.size, generator=g) for group in spec.groups}
    out = copy.deepcopy(model)
    out.load_state_dict(apply_permutations(model.state_dict(), spec, perms))
    return out, perms
