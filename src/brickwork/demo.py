"""``brickwork demo``: small demo checkpoints (cached) merged with several methods.

Builds a tiny random Llama base and three "fine-tunes" (the base plus a low-rank task
update each, plus noise), merges them with several methods through the same streaming
path as ``brickwork merge``, loads each output with transformers and prints how far each
merge is from every fine-tune's task update.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def _cache_dir() -> Path:
    return Path(os.environ.get("BRICKWORK_CACHE", ".cache/brickwork")) / "demo-v1"


def build_demo_models(root: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {n: root / n for n in ("base", "task_a", "task_b", "task_c")}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(paths["base"])
    for i, name in enumerate(("task_a", "task_b", "task_c")):
        g = torch.Generator().manual_seed(100 + i)
        sd = {k: v.clone() for k, v in base.state_dict().items()}
        for k, v in sd.items():
            if v.ndim == 2:  # a rank-4 task update plus small noise, like a fine-tune
                u = torch.randn(v.shape[0], 4, generator=g) * 0.02
                w = torch.randn(4, v.shape[1], generator=g)
                sd[k] = v + u @ w + 0.002 * torch.randn(v.shape, generator=g)
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(sd)
        m.save_pretrained(paths[name])
    return paths


def run_demo(out: Path | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from .checkpoint.reader import open_checkpoint
    from .merge.api import merge

    console = Console()
    root = _cache_dir()
    paths = build_demo_models(root / "models")
    out = out or root / "merged"
    recipes = {
        "linear": {"method": "linear"},
        "task_arithmetic λ=1": {"method": "task_arithmetic", "parameters": {"lambda": 1.0}},
        "ties d=0.3 λ=1": {"method": "ties", "parameters": {"density": 0.3, "lambda": 1.0}},
        "dare_ties d=0.5": {"method": "dare_ties", "parameters": {"density": 0.5}},
        "della d=0.5": {"method": "della", "parameters": {"density": 0.5, "epsilon": 0.1}},
        "model_stock": {"method": "model_stock"},
        "karcher": {"method": "karcher"},
    }
    base = open_checkpoint(paths["base"])
    tasks = {n: open_checkpoint(paths[n]) for n in ("task_a", "task_b", "task_c")}
    table = Table(title="brickwork demo: 3 fine-tunes of a tiny Llama merged")
    table.add_column("method")
    table.add_column("seconds", justify="right")
    for n in tasks:
        table.add_column(f"kept of {n}", justify="right")
    table.add_column("loads in transformers")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    for label, spec in recipes.items():
        recipe = {
            **spec,
            "base": str(paths["base"]),
            "models": [{"model": str(p)} for n, p in paths.items() if n != "base"],
        }
        dest = out / label.split()[0]
        t0 = time.perf_counter()
        merge(recipe, dest, force=True, progress=False)
        secs = time.perf_counter() - t0
        merged = open_checkpoint(dest)
        kept = []
        for tk in tasks.values():  # projection of the merged update onto each task update
            num = den = 0.0
            for name in base.names:
                if base.info(name).dtype.is_floating_point and len(base.info(name).shape) == 2:
                    tau = tk.get(name).double() - base.get(name).double()
                    d = merged.get(name).double() - base.get(name).double()
                    num += (d * tau).sum().item()
                    den += (tau * tau).sum().item()
            kept.append(f"{num / den:.0%}")
        model = AutoModelForCausalLM.from_pretrained(dest)
        ok = torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all().item()
        table.add_row(label, f"{secs:.2f}", *kept, "yes" if ok else "NO")
    console.print(table)
    console.print(
        f"'kept of X' is the share of fine-tune X's task vector the merge retains (100% = all of it). Outputs: {out}"
    )
