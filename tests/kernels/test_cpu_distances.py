"""cpu_anchor_distances (the CPU server's matcher) vs matching.reference_match on fresh random
inputs: anchors as long as the content and longer, several dtypes, and the server's pool
blocks."""

import pytest
import torch

from kvcomm_sglang.kernels.cpu_distances import cpu_anchor_distances
from kvcomm_sglang.kvblock import StoredKV
from kvcomm_sglang.matching import reference_match


def block(gen, n, dtype, layers=3, heads=2, dim=16):
    k, v = (torch.randn(layers, n, heads, dim, generator=gen) * 3).to(dtype), \
        torch.randn(layers, n, heads, dim, generator=gen).to(dtype)
    return StoredKV(k, v, torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [(), (9,), (9, 9), (9, 12, 30), (12, 9, 9, 17)])
def test_cpu_distances_match_the_reference(dtype, lengths):
    gen = torch.Generator().manual_seed(len(lengths) * 7 + sum(lengths))
    content = block(gen, 9, dtype)
    embs = [block(gen, n, dtype) for n in lengths]
    got = cpu_anchor_distances(content, embs)
    if not embs:
        assert [tuple(g.shape) for g in got] == [(0, 9), (0, 9), (0, 3, 2, 16), (0, 3, 2, 16),
                                                 (0,)]
        return
    want = reference_match(content, embs)
    for name, g, w in zip(("ph_k", "ph_v", "pf_k", "pf_v", "gate_v"), got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5, msg=name)


def test_cpu_matcher_on_the_servers_pool_blocks():
    """The runtime's CPU matcher on blocks stored in a pool (PoolKV), as the server calls it."""
    from kvcomm_sglang.kernels import TensorKVPool
    from kvcomm_sglang.runtime_patch.runtime import cpu_matcher
    from kvcomm_sglang.runtime_patch.segment_store import SegmentStore

    gen = torch.Generator().manual_seed(5)
    pool = TensorKVPool(4, 300, 3, 64, torch.bfloat16)

    class Allocator:
        alloc, free = pool.alloc, pool.free

    store = SegmentStore(pool, Allocator(), 299)

    def stored(n):
        k, v = torch.randn(2, 4, n, 3, 64, generator=gen)
        return store.make(k, v, torch.zeros(n, dtype=torch.long))

    content, embs = stored(20), [stored(20), stored(33), stored(20)]
    for g, w in zip(cpu_matcher()(content, embs), reference_match(content, embs)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
