"""The LM suite's models: a small Llama pretrained on every domain, one fine-tune per domain.

Every model is a Hugging Face directory (``config.json``, ``model.safetensors``, the
tokenizer) written by the shared :class:`~brickwork.checkpoint.writer.CheckpointWriter`
under ``$BRICKWORK_CACHE/bench/lm-<hash>/``, the hash covering everything that determines
it (configuration, data fingerprints, seed, the parent model's hash, torch's version and
:data:`CODE_VERSION`), so a second run loads instead of training and
``AutoModelForCausalLM.from_pretrained`` loads any of them.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import lm_data as LD
from .train import cache_key, cache_root

#: Bump when a change here changes what training produces.
CODE_VERSION = "bench-lm-1"


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    seq_len: int = 128
    batch_size: int = 16
    tokenizer_docs: int = 4000  # pretrain documents per domain the tokenizer learns from
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    finetune_steps: int = 80
    finetune_lr: float = 1e-3
    warmup: float = 0.05
    weight_decay: float = 0.1
    val_seqs: int = 48  # per domain: hyperparameter selection
    test_seqs: int = 192  # per domain: the scores and their bootstrap intervals

    def pretrain_part(self) -> dict[str, Any]:
        """The fields that determine the tokenizer and the base model."""
        d = asdict(self)
        for k in ("finetune_steps", "finetune_lr", "val_seqs", "test_seqs"):
            d.pop(k)
        return d


FULL = LMConfig()
QUICK = replace(
    FULL, vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
    num_kv_heads=2, seq_len=32, batch_size=8, tokenizer_docs=300, pretrain_steps=30,
    finetune_steps=12, val_seqs=8, test_seqs=24,
)  # fmt: skip


def llama_config(cfg: LMConfig, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=False,  # merges and upcycling treat embeddings and head apart
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def model_key(what: str, **parts: Any) -> str:
    return cache_key(kind="lm", what=what, lm_code=CODE_VERSION, **parts)


def cached_dir(key: str) -> Path | None:
    d = cache_root() / f"lm-{key}"
    return d if (d / "config.json").exists() and (d / "model.safetensors").exists() else None


def save_model(
    model: torch.nn.Module,
    out: Path,
    *,
    side_files: Path,
    record: dict[str, Any],
    force: bool = False,
) -> Path:
    """``model``'s weights (float32) + ``side_files``'s config and tokenizer, written
    atomically through the shared writer; ``record`` goes to ``brickwork.json``."""
    from ..checkpoint.provenance import environment
    from ..checkpoint.reader import TensorInfo
    from ..checkpoint.writer import CheckpointWriter

    state = {k: v.detach() for k, v in model.state_dict().items()}
    infos = [TensorInfo(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    with CheckpointWriter(out, infos, force=force, side_files=side_files) as w:
        for i in infos:
            w.write(i.name, state[i.name])
        w.add_text("config.json", model.config.to_json_string())
        w.add_text("brickwork.json", json.dumps({**record, "environment": environment()},
                                                indent=2) + "\n")  # fmt: skip
    return out


def export_model(src: Path, out: Path, *, record: dict[str, Any]) -> Path:
    """Copy the HF directory ``src`` to ``out`` through the shared writer (atomic)."""
    from safetensors.torch import load_file

    from ..checkpoint.provenance import environment
    from ..checkpoint.reader import TensorInfo
    from ..checkpoint.writer import CheckpointWriter

    state = load_file(str(src / "model.safetensors"))
    infos = [TensorInfo(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    with CheckpointWriter(out, infos, force=True, side_files=src, say=lambda _m: None) as w:
        for i in infos:
            w.write(i.name, state[i.name])
        w.add_text("brickwork.json", json.dumps({**record, "environment": environment()},
                                                indent=2) + "\n")  # fmt: skip
    return out


# ----------------------------------------------------------------------------- training


def _lr_lambda(steps: int, warmup: float) -> Callable[[int], float]:
    w = max(1, int(steps * warmup))

    def f(s: int) -> float:  # linear warmup, cosine decay to 10 %
        if s < w:
            return (s + 1) / w
        p = (s - w) / max(1, steps - w)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    return f


def train_lm(
    model: torch.nn.Module,
    seqs: Sequence[Sequence[int]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    warmup: float,
    weight_decay: float,
    seed: int,
    progress: Callable[[], None] | None = None,
) -> list[float]:
    """AdamW on next-token loss over ``seqs`` (epochs of seeded permutations); returns the
    loss of every step."""
    torch.manual_seed(seed)
    data = torch.tensor(list(seqs), dtype=torch.long)  # (sequences, seq_len)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup))
    model.train()
    losses: list[float] = []
    order = torch.randperm(len(data), generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        x = data[order[pos : pos + batch_size]]  # (batch, seq_len)
        pos += batch_size
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(round(float(loss.detach()), 4))
        if progress is not None:
            progress()
    model.eval()
    return losses


def pretrain(
    cfg: LMConfig,
    tokenizer: Any,
    seqs: Sequence[Sequence[int]],
    out: Path,
    *,
    seed: int,
    record: dict[str, Any],
    progress: Callable[[], None] | None = None,
) -> Path:
    """Initialise a ``LlamaForCausalLM`` (seeded), train it on ``seqs``, save it with the
    tokenizer at ``out``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(cfg, tokenizer))
    t0 = time.perf_counter()
    losses = train_lm(model, seqs, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                      batch_size=cfg.batch_size, warmup=cfg.warmup,
                      weight_decay=cfg.weight_decay, seed=seed, progress=progress)  # fmt: skip
    seconds = round(time.perf_counter() - t0, 2)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        rec = {**record, "train_seconds": seconds, "losses": losses[:: max(1, len(losses) // 50)]}
        return save_model(model, out, side_files=Path(tmp), record=rec)


def finetune(
    cfg: LMConfig,
    base_dir: Path,
    seqs: Sequence[Sequence[int]],
    out: Path,
    *,
    seed: int,
    record: dict[str, Any],
    progress: Callable[[], None] | None = None,
) -> Path:
    """Train a copy of the model at ``base_dir`` on ``seqs`` (every parameter), save it at
    ``out`` with the base's config and tokenizer."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    t0 = time.perf_counter()
    losses = train_lm(model, seqs, steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                      batch_size=cfg.batch_size, warmup=cfg.warmup, weight_decay=0.0,
                      seed=seed, progress=progress)  # fmt: skip
    rec = {**record, "train_seconds": round(time.perf_counter() - t0, 2), "losses": losses}
    return save_model(model, out, side_files=base_dir, record=rec)


def _finetune_job(spec: dict[str, Any]) -> float:
    """One fine-tune in a worker process (spawned, one torch thread)."""
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per worker otherwise
    t0 = time.perf_counter()
    finetune(LMConfig(**spec["cfg"]), Path(spec["base"]), spec["seqs"], Path(spec["out"]),
             seed=spec["seed"], record=spec["record"])  # fmt: skip
    return time.perf_counter() - t0


def finetune_all(jobs: list[dict[str, Any]], *, processes: int, progress: Any = None) -> None:
    """Run :func:`finetune` for each spec (``cfg``, ``base``, ``seqs``, ``out``, ``seed``,
    ``record``): in this process when ``processes <= 1``, else in that many spawned ones."""
    if not jobs:
        return
    if processes <= 1 or len(jobs) == 1:
        for j in jobs:
            finetune(LMConfig(**j["cfg"]), Path(j["base"]), j["seqs"], Path(j["out"]),
                     seed=j["seed"], record=j["record"])  # fmt: skip
            if progress is not None:
                progress()
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")  # no fork of a process that holds torch threads
    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=ctx) as pool:
        for f in as_completed([pool.submit(_finetune_job, j) for j in jobs]):
            f.result()  # re-raises a worker's error here
            if progress is not None:
                progress()


# ----------------------------------------------------------------------------- the models of a run


class Models:
    """The tokenizer, base and fine-tunes of one configuration: cached HF directories."""

    def __init__(self, cfg: LMConfig, texts: Mapping[str, LD.DomainText], seed: int) -> None:
        self.cfg, self.texts, self.seed = cfg, texts, seed
        fps = [(d, t.fingerprint()) for d, t in texts.items()]
        self.base_key = model_key("base", cfg=cfg.pretrain_part(), data=fps, seed=seed)
        ft = {"steps": cfg.finetune_steps, "lr": cfg.finetune_lr}
        self.keys = {d: model_key("finetune", base=self.base_key, domain=d, data=fp,
                                  cfg=ft, seed=seed) for d, fp in fps}  # fmt: skip
        self.hits: dict[str, bool] = {}
        self.train_seconds: dict[str, float | None] = {}

    def dir(self, key: str) -> Path:
        return cache_root() / f"lm-{key}"

    def prepare(self, *, jobs: int, bar: Callable[[str, int], Any]) -> None:
        """Train (or find in the cache) the base and every fine-tune."""
        cfg = self.cfg
        self.hits["base"] = cached_dir(self.base_key) is not None
        if not self.hits["base"]:
            tok = LD.train_tokenizer(LD.tokenizer_sample(self.texts, cfg.tokenizer_docs),
                                     cfg.vocab_size)  # fmt: skip
            need = math.ceil(cfg.pretrain_steps * cfg.batch_size / len(self.texts))
            seqs = [s for t in self.texts.values()
                    for s in LD.sequences(tok, t.buckets["pretrain"], cfg.seq_len, need)]  # fmt: skip
            with bar("pretrain the base", cfg.pretrain_steps) as b:
                pretrain(cfg, tok, seqs, self.dir(self.base_key), seed=self.seed,
                         record={"kind": "bench.lm.base", "config": asdict(cfg),
                                 "domains": list(self.texts), "sequences": len(seqs)},
                         progress=b.advance if b is not None else None)  # fmt: skip
        self.tokenizer = self._tokenizer()
        todo = []
        for d, key in self.keys.items():
            self.hits[d] = cached_dir(key) is not None
            if not self.hits[d]:
                n = cfg.finetune_steps * cfg.batch_size
                seqs = LD.sequences(
                    self.tokenizer, self.texts[d].buckets["finetune"], cfg.seq_len, n
                )
                todo.append({"cfg": asdict(cfg), "base": str(self.dir(self.base_key)),
                             "seqs": seqs, "out": str(self.dir(key)), "seed": self.seed,
                             "record": {"kind": "bench.lm.finetune", "domain": d,
                                        "base": self.base_key, "sequences": len(seqs)}})  # fmt: skip
        with bar(f"fine-tunes ({min(jobs, max(1, len(todo)))} processes)", len(todo)) as b:
            finetune_all(todo, processes=jobs, progress=b.advance if b is not None else None)
        for name, key in [("base", self.base_key), *self.keys.items()]:
            rec = read_json(self.dir(key) / "brickwork.json")
            self.train_seconds[name] = rec.get("train_seconds")

    def _tokenizer(self) -> Any:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(self.dir(self.base_key)))

    def load(self, key: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.dir(key)), dtype=torch.float32)

    def state(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.dir(key) / "model.safetensors"))


def read_json(p: Path) -> dict[str, Any]:
    """A JSON file's object; {} when it is missing or unreadable."""
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
