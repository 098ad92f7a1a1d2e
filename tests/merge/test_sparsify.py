import torch

from brickwork.merge.sparsify import magnitude


def test_magnitude_keeps_exactly_k_and_breaks_threshold_ties_by_lowest_index():
    x = torch.tensor([1.0, -3.0, 2.0, -2.0, 2.0, 0.5])  # k = 3: -3 and two of the three |2|
    out = magnitude(x, 0.5)
    assert torch.equal(out, torch.tensor([0.0, -3.0, 2.0, -2.0, 0.0, 0.0]))


def test_magnitude_equals_topk_selection_without_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 40, generator=g)
    out = magnitude(x, 0.3)
    k = int(0.3 * x.numel())
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[torch.topk(x.abs().reshape(-1), k).indices] = True
    assert torch.equal(out, x * keep.reshape(x.shape))
    assert int((out != 0).sum()) == k
