"""Agreement with PEFT: adapters as merge inputs, and merging adapters into one adapter.

On a small random Llama (hidden 64, 4 layers, vocab 256) three random LoRA adapters are made
by peft itself (init_lora_weights=False): A (r 8, alpha 16, q/v/down_proj + embed_tokens,
modules_to_save lm_head), B (r 8, alpha 8, rslora, q/k/down_proj + embed_tokens, an
alpha_pattern) and C (r 4, q_proj only). Reported:

* ``AdapterCheckpoint(base, A/B)`` against PEFT's ``merge_and_unload`` (max |Δ| over every
  tensor);
* ``brickwork.compress.merge_adapters`` against ``PeftModel.add_weighted_adapter`` for every
  combination type (weights 0.7, -0.4; density 0.5): max |Δ| of the merged A and B tensors
  and of the products B·A, and the time of each. DARE is random: PEFT draws from torch's
  global RNG; it is seeded right after PEFT initialises the new adapter (by wrapping
  ``_freeze_adapter``, which runs between the two) and brickwork gets the same seed and
  PEFT's module order, so the masks are the same.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/agreement_peft_adapters.py

Results: ``benchmarks/results/agreement_peft_adapters.json`` (see benchmarks/README.md).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from brickwork.checkpoint.reader import open_checkpoint
from brickwork.compress.adapters import COMBINATION_TYPES, AdapterCheckpoint, merge_adapters

OUT = Path(__file__).resolve().parent / "results" / "agreement_peft_adapters.json"
SEED = 5


def _base(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


def build(root: Path) -> tuple[Path, list[Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    specs = [
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
             modules_to_save=["lm_head"]),
        dict(r=8, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 24},
             target_modules=["q_proj", "k_proj", "down_proj", "embed_tokens"]),
        dict(r=4, lora_alpha=4, target_modules=["q_proj"]),
    ]  # fmt: skip
    ads = []
    for i, kw in enumerate(specs):
        torch.manual_seed(10 + i)
        m = get_peft_model(_base(root / "base"), LoraConfig(init_lora_weights=False, **kw))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.mul_(0.3)
                elif "modules_to_save" in n:
                    p.add_(torch.randn_like(p) * 0.05)
        m.save_pretrained(root / f"ad{i}")
        ads.append(root / f"ad{i}")
    return root / "base", ads


def peft_merge(base: Path, ads: list[Path], weights, ctype: str, **kw):
    import peft.tuners.lora.model as lm
    from peft import PeftModel, get_peft_model_state_dict

    model = PeftModel.from_pretrained(_base(base), ads[0], adapter_name="a0")
    for i, a in enumerate(ads[1:], 1):
        model.load_adapter(a, adapter_name=f"a{i}")
    orig = lm._freeze_adapter

    def freeze_then_seed(*args):
        orig(*args)
        torch.manual_seed(SEED)

    lm._freeze_adapter = freeze_then_seed
    try:
        t0 = time.perf_counter()
        model.add_weighted_adapter(
            [f"a{i}" for i in range(len(ads))], weights, "m", combination_type=ctype, **kw
        )
        dt = time.perf_counter() - t0
    finally:
        lm._freeze_adapter = orig
    sd = {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name="m").items()}
    order = [n for n, _ in model.base_model.model.named_modules()]
    return {k: v for k, v in sd.items() if "lora_" in k}, order, dt


def _products(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, a in sd.items():
        if k.endswith("lora_A.weight") or k.endswith("lora_embedding_A"):
            b = sd[k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
            out[k] = b.double() @ a.double()
    return out


def _maxdiff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if sorted(a) != sorted(b):
        raise SystemExit(f"different keys: {sorted(set(a) ^ set(b))[:5]}")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def main() -> None:
    import peft
    import transformers

    torch.set_num_threads(1)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base, ads = build(Path(tmp))
        from peft import PeftModel

        checkpoint_rows = {}
        for i in (0, 1):
            ref = PeftModel.from_pretrained(_base(base), ads[i]).merge_and_unload().state_dict()
            ck = AdapterCheckpoint(open_checkpoint(base), ads[i])
            checkpoint_rows[f"ad{i}"] = _maxdiff({n: ck.get(n) for n in ck.names}, ref)
        print("AdapterCheckpoint vs merge_and_unload, max |Δ|:", checkpoint_rows)
        weights = [0.7, -0.4]
        for ctype in COMBINATION_TYPES:
            kw = {} if ctype in ("linear", "cat", "svd") else {"density": 0.5}
            ref, order, t_peft = peft_merge(base, ads[:2], weights, ctype, **kw)
            t0 = time.perf_counter()
            got = merge_adapters(ads[:2], weights, ctype, seed=SEED, module_order=order, **kw)
            t_ours = time.perf_counter() - t0
            lora = {k: v for k, v in got.tensors.items() if "lora_" in k}
            rows[ctype] = {
                "max_abs_diff_factors": _maxdiff(lora, ref),
                "max_abs_diff_BA": _maxdiff(_products(lora), _products(ref)),
                "rank": got.config["r"],
                "seconds_brickwork": round(t_ours, 4),
                "seconds_peft": round(t_peft, 4),
            }
            print(ctype, rows[ctype])
        ref, _, _ = peft_merge(base, [ads[0], ads[2]], [1.5, 0.5], "cat")
        got = merge_adapters([ads[0], ads[2]], [1.5, 0.5], "cat")
        lora = {k: v for k, v in got.tensors.items() if "lora_" in k}
        rows["cat_ranks_8_and_4"] = {
            "max_abs_diff_factors": _maxdiff(lora, ref),
            "rank": got.config["r"],
        }
        print("cat (ranks 8 + 4)", rows["cat_ranks_8_and_4"])
    result = {
        "adapter_checkpoint_vs_merge_and_unload": checkpoint_rows,
        "merge_adapters_vs_add_weighted_adapter": rows,
        "weights": weights,
        "density": 0.5,
        "seed": SEED,
        "versions": {
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
