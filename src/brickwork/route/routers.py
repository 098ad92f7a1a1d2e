"""Router initialisation and training for upcycled MoEs (module level: a model and text).

All modes produce router rows of shape (layers, n_experts, hidden); row ``e`` of layer
``l`` is multiplied with the input of layer ``l``'s MoE block, i.e. the output of
``post_attention_layernorm`` (the "MLP input"), which is what a Mixtral / Qwen2-MoE router
sees. Hidden states are read from the **base** model with forward pre-hooks on every
``layers[l].mlp`` and averaged over the (unpadded) tokens of each text.

- ``hidden`` (mergekit-moe's default mode): ``mean(positive prompts) - mean(negative
  prompts)`` per layer, scaled to unit norm. mergekit reads the decoder layer's *input*
  (the residual stream) and, in its ``hidden`` mode, the last token; brickwork reads what
  the router multiplies (the normed MLP input) averaged over all tokens.
- ``cheap_embed``: the mean token embedding of the positive prompts minus that of the
  negative ones, unit norm, the same row in every layer (as mergekit; no model is run).
- ``task``: per expert, the centroid ``c_e`` of its unlabelled examples' mean MLP inputs;
  rows ``u_e = s_l * normalize(c_e - mean_e c_e)``. Centring removes the component every
  text shares (which would otherwise dominate and send everything to one expert).
  ``s_l = task_scale / mean_i std_e(normalize(c_e - c̄) · x_i)`` over the examples ``x_i``,
  so that on the examples the router logits spread with a standard deviation of
  ``task_scale`` (default 1) across experts: softmax is neither one-hot nor uniform.
- ``train``: start from ``task`` (or random) rows, build the MoE in memory from the
  exported tensors (a dense base model whose MLPs are replaced by :class:`MoELayer`
  wrappers), freeze everything but the routers, and minimise
  ``LM loss + aux_loss_coef * load_balancing_loss`` on mixed unlabelled texts with Adam.
  The shared-expert gate is kept frozen.

The base model is held in float32 (4 bytes a parameter; ``device`` picks CPU or GPU, default
CUDA when available); ``train`` also holds every expert, so it needs the whole MoE in float32.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..checkpoint.reader import Checkpoint
from ..errors import CheckpointError, RecipeError
from .moe import FFN, MoELayer, load_balancing_loss


@dataclass(frozen=True)
class RouterData:
    """The text a router mode needs; lists of lists are one list per expert."""

    positive_prompts: Sequence[Sequence[str]] = ()
    negative_prompts: Sequence[Sequence[str]] = ()
    examples: Sequence[Sequence[str]] = ()
    shared_positive: Sequence[str] = ()
    shared_negative: Sequence[str] = ()
    train_texts: Sequence[str] = ()  # default for train: every expert's examples, mixed
    tokenizer: str | os.PathLike | None = None  # default: the base model's directory
    max_length: int = 256
    task_scale: float = 1.0
    train_init: Literal["task", "random"] = "task"
    train_steps: int = 30
    train_lr: float = 1e-2
    train_batch_size: int = 4
    aux_loss_coef: float = 0.01
    device: str | None = None


def check_router_data(mode: str, data: RouterData | None, n_experts: int) -> None:
    """Every expert has what ``mode`` needs; errors name the recipe field."""
    if mode == "random":
        return
    if data is None:
        raise RecipeError(
            f"upcycle: router_init '{mode}' needs text (router_data: prompts or examples)."
        )

    def per_expert(lists: Sequence[Sequence[str]], key: str, why: str) -> None:
        for e in range(n_experts):
            if e >= len(lists) or not [t for t in lists[e] if t.strip()]:
                raise RecipeError(
                    f"experts[{e}].{key}: router_init '{mode}' needs at least one {why} per "
                    "expert; none given."
                )

    if mode in ("hidden", "cheap_embed"):
        per_expert(data.positive_prompts, "positive_prompts", "prompt")
    elif mode == "task" or (mode == "train" and data.train_init == "task"):
        per_expert(data.examples, "examples", "unlabelled example (examples or examples_file)")
    if mode == "train" and not data.train_texts and not any(data.examples):
        raise RecipeError(
            "router_train.texts: router_init 'train' needs unlabelled texts "
            "(router_train.texts or texts_file, or the experts' examples)."
        )
    if data.task_scale <= 0:
        raise RecipeError(f"router_scale must be positive, got {data.task_scale}.")


# -- the base model and its MLP inputs -----------------------------------------------------
def _device(data: RouterData) -> torch.device:
    return torch.device(data.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_tokenizer(base_dir: Path | None, data: RouterData) -> Any:
    from transformers import AutoTokenizer

    where = Path(data.tokenizer) if data.tokenizer is not None else base_dir
    try:
        return AutoTokenizer.from_pretrained(str(where))
    except Exception as e:  # noqa: BLE001 (transformers raises many kinds)
        raise CheckpointError(
            f"tokenizer '{where}': cannot load a tokenizer ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). The router init runs text through "
            "the base model: give a directory with tokenizer files in the recipe's "
            "'tokenizer' key, or put them next to the base's config.json."
        ) from None


def _load_base(base_dir: Path | None, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return model.to(device).eval()


def _tokenize(tok: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    ids = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    return [x for x in ids if x] or [[0]]


def _pad(batch: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids and mask (batch, tokens); causal attention never sees the pads."""
    n = max(len(x) for x in batch)
    ids = torch.zeros(len(batch), n, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return ids.to(device), mask.to(device)


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def mlp_inputs(
    model: nn.Module, tok: Any, texts: Sequence[str], *, max_length: int, batch_size: int = 8
) -> torch.Tensor:
    """Mean MLP input over each text's tokens: (n_texts, layers, hidden), float32 on CPU."""
    layers = _layers(model)
    device = next(model.parameters()).device
    seen: list[torch.Tensor | None] = [None] * len(layers)

    def hook(i: int) -> Callable:
        def f(_module: nn.Module, args: tuple) -> None:
            seen[i] = args[0]  # (batch, tokens, hidden)

        return f

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    out = []
    try:
        ids_all = _tokenize(tok, texts, max_length)
        for s in range(0, len(ids_all), batch_size):
            ids, mask = _pad(ids_all[s : s + batch_size], device)
            model(input_ids=ids, attention_mask=mask)
            m = mask[..., None].float()  # (batch, tokens, 1)
            per_layer = [(h.float() * m).sum(1) / m.sum(1) for h in seen]  # (batch, hidden) each
            out.append(torch.stack(per_layer, dim=1).cpu())  # (batch, layers, hidden)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out)


def prompt_rows(
    mode: str,
    base_dir: Path | None,
    base: Checkpoint,
    data: RouterData,
    *,
    with_shared: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``hidden`` / ``cheap_embed`` rows (layers, experts, hidden) and, if ``with_shared``,
    the shared expert's gate rows (layers, hidden) from its prompts (mergekit's scheme)."""
    tok = load_tokenizer(base_dir, data)
    groups = [(list(p), list(data.negative_prompts[e]) if e < len(data.negative_prompts) else [])
              for e, p in enumerate(data.positive_prompts)]  # fmt: skip
    if with_shared:
        groups.append((list(data.shared_positive), list(data.shared_negative)))
    n_layers = int((base.config or {})["num_hidden_layers"])
    if mode == "cheap_embed":
        name = next((n for n in base.names if n.endswith("embed_tokens.weight")), None)
        if name is None:
            raise CheckpointError("base: no '*embed_tokens.weight' tensor for cheap_embed.")
        embed = base.get(name).float()  # (vocab, hidden)

        def vec(texts: list[str]) -> torch.Tensor:
            ids = torch.tensor([i for x in _tokenize(tok, texts, data.max_length) for i in x])
            return embed[ids].mean(0).expand(n_layers, -1)  # (layers, hidden)
    else:
        model = _load_base(base_dir, _device(data))

        def vec(texts: list[str]) -> torch.Tensor:
            return mlp_inputs(model, tok, texts, max_length=data.max_length).mean(0)

    rows = []
    for pos, neg in groups:
        v = vec(pos)
        if neg:
            v = v - vec(neg)
        rows.append(nn.functional.normalize(v, dim=-1))  # (layers, hidden)
    stacked = torch.stack(rows, dim=1)  # (layers, groups, hidden)
    if with_shared:
        return stacked[:, :-1].contiguous(), stacked[:, -1].contiguous()
    return stacked, None


def task_rows(
    base_dir: Path | None, data: RouterData, *, progress: bool = False
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``task`` rows (layers, experts, hidden) and the per-layer scales used."""
    tok = load_tokenizer(base_dir, data)
    model = _load_base(base_dir, _device(data))
    per_expert = [
        mlp_inputs(model, tok, list(ex), max_length=data.max_length) for ex in data.examples
    ]  # (n_e, layers, hidden) each
    del model
    return centroid_rows(per_expert, data.task_scale)


def centroid_rows(
    per_expert: Sequence[torch.Tensor], scale: float = 1.0
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Rows from per-example states ``per_expert[e]`` (n_e, layers, hidden); see the module."""
    c = torch.stack([x.mean(0) for x in per_expert], dim=1)  # (layers, experts, hidden)
    u = c - c.mean(dim=1, keepdim=True)
    norms = u.norm(dim=-1)  # (layers, experts)
    if bool((norms <= 1e-5 * c.norm(dim=-1).clamp(min=1e-12)).any()):
        raise RecipeError(
            "experts[*].examples: the examples of different experts give the same centroid "
            "in some layer, so no router can tell them apart; give examples that differ."
        )
    u = u / norms[..., None]
    x = torch.cat(list(per_expert))  # (examples, layers, hidden)
    logits = torch.einsum("nlh,leh->nle", x, u)  # (examples, layers, experts)
    spread = (
        logits.std(dim=-1, unbiased=False).mean(0) if u.shape[1] > 1 else logits.abs().mean((0, 2))
    )  # (layers,)
    s = scale / spread.clamp(min=1e-12)
    return u * s[:, None, None], {"task_scale": scale, "task_layer_scales": s.tolist()}


# -- router training -----------------------------------------------------------------------
class _UpcycledMLP(nn.Module):
    """A Mixtral / Qwen2-MoE sparse block around :class:`MoELayer`: routed experts plus an
    optional shared expert weighted by ``sigmoid(gate · x)``; keeps the router logits."""

    def __init__(self, moe: MoELayer, shared: FFN | None, gate: torch.Tensor | None) -> None:
        super().__init__()
        self.moe, self.shared = moe, shared
        self.register_buffer("gate", gate)
        self.logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.moe(x)
        self.logits = out.router_logits  # (tokens, n_experts)
        y = out.output
        if self.shared is not None:
            y = y + torch.sigmoid(x @ self.gate)[..., None] * self.shared(x)
        return y


def train_routers(
    base_dir: Path | None,
    *,
    merged: Mapping[str, Callable[[], torch.Tensor]],
    expert_ffn: Callable[[int, str], torch.Tensor],
    shared_ffn: Callable[[str], torch.Tensor] | None,
    shared_gate: torch.Tensor | None,
    rows: torch.Tensor,
    data: RouterData,
    top_k: int,
    seed: int,
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Router-only training of the in-memory MoE; returns trained rows and loss figures."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    device = _device(data)
    tok = load_tokenizer(base_dir, data)
    model = _load_base(base_dir, torch.device("cpu"))
    n_experts = rows.shape[1]
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, f in merged.items():
            if name in params:
                params[name].copy_(f().float())
        for i, layer in enumerate(_layers(model)):
            p = f"model.layers.{i}.mlp."
            gate0 = expert_ffn(0, p + "gate_proj.weight")
            d_ff, d_model = gate0.shape
            moe = MoELayer(d_model, d_ff, n_experts, top_k=top_k, routing="topk_softmax")
            for e in range(n_experts):
                g, u = expert_ffn(e, p + "gate_proj.weight"), expert_ffn(e, p + "up_proj.weight")
                moe.gate_up[e].copy_(torch.cat([g, u]).float())  # (2 * d_ff, d_model)
                moe.down[e].copy_(expert_ffn(e, p + "down_proj.weight").float())
            moe.router.weight.copy_(rows[i])
            shared = None
            if shared_ffn is not None:
                g, u = shared_ffn(p + "gate_proj.weight"), shared_ffn(p + "up_proj.weight")
                shared = FFN(d_model, g.shape[0])
                shared.w_in.weight.copy_(torch.cat([g, u]).float())
                shared.w_out.weight.copy_(shared_ffn(p + "down_proj.weight").float())
            gate = shared_gate[i].float().clone() if shared_gate is not None else None
            layer.mlp = _UpcycledMLP(moe, shared, gate)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = [layer.mlp for layer in _layers(model)]
    routers = [b.moe.router.weight for b in blocks]
    for w in routers:
        w.requires_grad_(True)

    texts = list(data.train_texts) or [t for ex in data.examples for t in ex]
    ids = _tokenize(tok, texts, data.max_length)
    random.Random(seed).shuffle(ids)
    bs = data.train_batch_size
    batches = [ids[s : s + bs] for s in range(0, len(ids), bs)]

    def objective(batch: Sequence[Sequence[int]]) -> torch.Tensor:
        x, mask = _pad(batch, device)
        labels = x.masked_fill(mask == 0, -100)
        lm = model(input_ids=x, attention_mask=mask, labels=labels).loss
        keep = mask.reshape(-1).bool()
        aux = load_balancing_loss([b.logits[keep] for b in blocks], top_k)
        return lm + data.aux_loss_coef * aux

    def evaluate() -> float:
        with torch.no_grad():
            return sum(float(objective(b)) for b in batches[:16]) / len(batches[:16])

    model.train(False)  # no dropout: the objective is deterministic
    before = evaluate()
    opt = torch.optim.Adam(routers, lr=data.train_lr)
    bar = tqdm(range(data.train_steps), desc="train routers", disable=not progress, leave=False)
    for step in bar:
        loss = objective(batches[step % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.detach().item():.4f}")
    after = evaluate()
    trained = torch.stack([w.detach().float().cpu() for w in routers])  # (layers, E, hidden)
    stats = {
        "train_steps": data.train_steps,
        "train_lr": data.train_lr,
        "aux_loss_coef": data.aux_loss_coef,
        "train_texts": len(texts),
        "train_objective_before": before,
        "train_objective_after": after,
    }
    return trained, stats
