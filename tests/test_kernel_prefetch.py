"""The L2 prefetch kernel (ops/prefetch.py): it reads exactly the planned prefix of each tensor (its
per-program maxima, the sink, give the largest word of each prefix), in one launch for up to three
tensors, and refuses what it cannot read; interpreted on CPU, compiled on a GPU."""

import pytest
import torch

pytest.importorskip("triton")

# tests/conftest.py sets TRITON_INTERPRET=1 before rwkvstate is imported when there is no GPU
from rwkvstate.ops import prefetch as pf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def weights(seed: int):
    """An fp16 matrix, the transposed view of a contiguous fp16 matrix (as the feed-forward's value
    weights) and an fp32 vector, of odd sizes, with random bits."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(301, 66, generator=gen).half()
    b = torch.randn(130, 42, generator=gen).half().t()  # [42, 130], storage order of the [130, 42] tensor
    c = torch.randn(77 * 35, generator=gen)
    return [t.to(DEVICE) for t in (a, b, c)]


def maxima(sink: torch.Tensor, parts: int) -> list[int]:
    P = sink.numel() // pf.MAX_TENSORS
    return [int(sink[i * P:(i + 1) * P].max()) for i in range(parts)]


@pytest.mark.parametrize("max_bytes", [4, 1000, 301 * 66 * 2, 301 * 66 * 2 + 130 * 42 * 2 + 12, 10**9])
def test_reads_the_planned_prefix(max_bytes):
    tensors = weights(seed=max_bytes % 97)
    sink = torch.full((pf.sink_size(DEVICE),), -5, dtype=torch.int32, device=DEVICE)
    pf.l2_prefetch(tensors, max_bytes, sink)
    words = pf.prefetch_plan(tensors, max_bytes)
    assert sum(w.numel() for w in words) * 4 == min(max_bytes, sum(t.numel() * t.element_size() for t in tensors))
    assert maxima(sink, len(words)) == [int(w.max()) for w in words]
    # the prefix is the storage order's: the transposed view is read as its contiguous tensor
    if len(words) > 1:
        assert torch.equal(words[1], tensors[1].t().reshape(-1).view(torch.int32)[: words[1].numel()])


def test_nothing_to_read_launches_nothing():
    tensors = weights(seed=1)
    sink = torch.full((pf.sink_size(DEVICE),), -5, dtype=torch.int32, device=DEVICE)
    for max_bytes in (0, 3, -8):
        pf.l2_prefetch(tensors, max_bytes, sink)
    assert bool((sink == -5).all())


def test_bad_input_is_refused():
    tensors = weights(seed=2)
    sink = torch.empty(pf.sink_size(DEVICE), dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="at most 3 tensors"):
        pf.l2_prefetch(tensors + tensors[:1], 100, sink)
    strided = torch.zeros(8, 8, device=DEVICE)[:, ::2]
    with pytest.raises(ValueError, match="dense tensor"):
        pf.l2_prefetch([strided], 100, sink)
    odd = torch.zeros(3, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="32-bit words"):
        pf.l2_prefetch([odd], 100, sink)
    for bad in (sink[:3], sink.float(), sink.cpu() if DEVICE == "cuda" else None):
        if bad is not None:
            with pytest.raises(ValueError, match="sink must be"):
                pf.l2_prefetch(tensors, 100, bad)
