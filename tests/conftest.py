"""Shared fixtures: tiny random Hugging Face models built from configs (no downloads).

Everything is session-scoped and small (hidden 32, 2 layers, vocab 128) so the whole
suite stays fast on two CPU cores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

VOCAB = 128
HIDDEN = 32

# `make test` runs two pytest workers on a two-core machine: one torch thread each. More
# threads than cores makes OpenMP spin-wait, which slowed small matmuls down tenfold.
torch.set_num_threads(1)


def _llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def _bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )


def _perturbed(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A 'fine-tune': a copy of ``model`` with small seeded noise on every float parameter."""
    import copy

    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def _write_tokenizer_stub(d: Path) -> None:
    # Side files that must be copied from the reference model into the output.
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}) + "\n")
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>"}) + "\n")


@dataclass(frozen=True)
class ModelFamily:
    base: Path
    ft1: Path
    ft2: Path


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> ModelFamily:
    """A tiny random Llama 'base' and two 'fine-tunes' of it, as HF directories."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base = LlamaForCausalLM(_llama_config()).eval()
    dirs = []
    for name, m in (("base", base), ("ft1", _perturbed(base, 1)), ("ft2", _perturbed(base, 2))):
        m.save_pretrained(root / name)
        _write_tokenizer_stub(root / name)
        dirs.append(root / name)
    return ModelFamily(*dirs)


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory) -> ModelFamily:
    from transformers import BertModel

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    base = BertModel(_bert_config()).eval()
    dirs = []
    for name, m in (("base", base), ("ft1", _perturbed(base, 1)), ("ft2", _perturbed(base, 2))):
        m.save_pretrained(root / name)
        dirs.append(root / name)
    return ModelFamily(*dirs)


@pytest.fixture(scope="session")
def llama_config_factory() -> Callable:
    return _llama_config


@pytest.fixture()
def run_cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """Run ``brickwork ARGS`` in-process; returns (exit code, stdout, stderr).

    Any exception other than SystemExit propagates, so a test fails loudly if the CLI
    would have printed a traceback.
    """
    from brickwork.cli import main

    def run(*args: str | os.PathLike) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run
