"""anchor_distances: Triton (interpreted on CPU, compiled on CUDA) vs the torch reference built
from the estimator, and the reference vs an explicit fp64 loop of the formulas (spec §4.2,
§5.1)."""

import pytest
import torch

from kvcomm_sglang.kernels import TensorKVPool
from kvcomm_sglang.kernels import distances
from kvcomm_sglang.kernels.distances import anchor_distances, anchor_distances_reference
from tests.torch_calls import TorchCalls

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: interpreted (see conftest.py)
FIELDS = ("ph_k", "ph_v", "pf_k", "pf_v", "gate_v")
TOL = dict(atol=1e-5, rtol=1e-5)        # fp32 math on both sides, only the summation order differs
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def make_case(num_tokens=7, num_anchors=3, dtype=torch.float32, heads=2, head_dim=32,
              num_layers=2, extra=(0, 3, 1, 5, 2), seed=0):
    """Random pool; candidate slots and anchors of length T + extra[a] (head = first T slots,
    tail = last T, so they overlap partly), all at shuffled slots."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [num_tokens + extra[a % len(extra)] for a in range(num_anchors)]
    num_slots = 1 + num_tokens + sum(lengths) + 5
    pool = TensorKVPool(num_layers, num_slots, heads, head_dim, dtype, device=DEVICE)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.copy_(torch.randn(buf.shape, generator=gen).to(dtype))
    slots = (torch.randperm(num_slots - 1, generator=gen) + 1).to(DEVICE)
    cand, rest = slots[:num_tokens], slots[num_tokens:]
    anchors = list(rest[: sum(lengths)].split(lengths))
    if not anchors:
        return pool, cand, rest[:0].view(0, num_tokens), rest[:0].view(0, num_tokens)
    head = torch.stack([s[:num_tokens] for s in anchors])
    tail = torch.stack([s[len(s) - num_tokens:] for s in anchors])
    return pool, cand, head, tail


def assert_matches(got, want, **tol):
    for name in FIELDS:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        torch.testing.assert_close(g, w, **(tol or TOL), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_anchors", [(1, 1), (7, 3), (33, 5)])
def test_triton_matches_reference(dtype, num_tokens, num_anchors):
    case = make_case(num_tokens, num_anchors, dtype, seed=num_tokens * 10 + num_anchors)
    assert_matches(anchor_distances(*case), anchor_distances_reference(*case))


@pytest.mark.parametrize("heads,head_dim", [(3, 24), (1, 16)])
def test_triton_partial_tiles(monkeypatch, heads, head_dim):
    """Tiny tiles: token, head and channel blocks partly masked, many programs per sum."""
    monkeypatch.setattr(distances, "_TILE_ELEMENTS", 64)
    case = make_case(7, 3, torch.float16, heads, head_dim, seed=4)       # 2 tokens x 1 head
    assert_matches(anchor_distances(*case), anchor_distances_reference(*case))
    case = make_case(5, 2, torch.float32, heads, head_dim, seed=5)       # 1 token x 2 heads
    assert_matches(anchor_distances(*case, block_t=1), anchor_distances_reference(*case))


def test_head_equals_tail_and_int32_slots():
    pool, cand, head, _ = make_case(5, 2, extra=(0,))
    case = (pool, cand.int(), head.int(), head.int())
    got, want = anchor_distances(*case), anchor_distances_reference(*case)
    assert_matches(got, want)
    gate_from_pf = torch.linalg.vector_norm(got.pf_v.flatten(1), dim=1)   # head == tail here
    torch.testing.assert_close(got.gate_v, gate_from_pf, **TOL)


def test_identical_anchor_has_zero_distance():
    pool, cand, head, _ = make_case(6, 2)
    head[1] = cand
    got = anchor_distances(pool, cand, head, head)
    for name in FIELDS:
        assert torch.equal(getattr(got, name)[1], torch.zeros_like(getattr(got, name)[1])), name
    assert bool((got.gate_v[0] > 0).all())


def test_reference_matches_explicit_fp64_loop():
    pool, cand, head, tail = make_case(4, 2, torch.float32, heads=2, head_dim=8)
    k, v = (torch.stack([b.double() for b in bufs]) for bufs in (pool.k_buffer, pool.v_buffer))
    want = anchor_distances_reference(pool, cand, head, tail)
    for a in range(head.shape[0]):
        for x, name in ((k, "k"), (v, "v")):
            d_head = x[:, cand] - x[:, head[a]]                         # (L, T, H, D)
            d_tail = x[:, cand] - x[:, tail[a]]
            ph = torch.stack([d_head[:, j].abs().mean() for j in range(len(cand))])
            torch.testing.assert_close(getattr(want, f"ph_{name}")[a].double(), ph, **TOL)
            pf = d_tail.pow(2).sum(1).sqrt()
            torch.testing.assert_close(getattr(want, f"pf_{name}")[a].double(), pf, **TOL)
            if name == "v":
                torch.testing.assert_close(want.gate_v[a].double(), d_head.pow(2).sum().sqrt(),
                                           **TOL)


def test_no_anchors_or_no_tokens():
    for num_tokens, num_anchors in ((5, 0), (0, 2)):
        pool, cand, head, tail = make_case(num_tokens, num_anchors)
        got = anchor_distances(pool, cand, head, tail)
        want = anchor_distances_reference(pool, cand, head, tail)
        assert_matches(got, want)


def _bad_inputs(pool, cand, head, tail):
    """name -> (pool, cand, head, tail, message fragment) of inputs the launcher must refuse."""
    num_slots = pool.k_buffer[0].shape[0]
    f64_pool = TensorKVPool(2, num_slots, 2, 32, torch.float64, device=DEVICE)
    strided = TensorKVPool(2, num_slots, 2, 32, device=DEVICE)
    strided.v_buffer[1] = torch.zeros(num_slots, 80, device=DEVICE)[:, :64].view(num_slots, 2, 32)
    cases = [
        ("cand 2-D", pool, cand[None], head, tail, "cand_slots"),
        ("head length", pool, cand, head[:, :-1], tail, "head_slots"),
        ("tail shape", pool, cand, head, tail[:1], "tail_slots"),
        ("slot dtype", pool, cand.float(), head, tail, "cand_slots"),
        ("cand out of range", pool, cand.clone().fill_(num_slots), head, tail, "cand_slots"),
        ("head negative", pool, cand, head.clone().fill_(-1), tail, "head_slots"),
        ("tail out of range", pool, cand, head, tail.clone().fill_(num_slots), "tail_slots"),
        ("pool dtype", f64_pool, cand, head, tail, "dtype"),
        ("slot stride", strided, cand, head, tail, "stride"),
    ]
    return {name: rest for name, *rest in cases}


BAD_INPUTS = ("cand 2-D", "head length", "tail shape", "slot dtype", "cand out of range",
              "head negative", "tail out of range", "pool dtype", "slot stride")


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_refuses_bad_input(name):
    *args, fragment = _bad_inputs(*make_case(7, 2))[name]
    for run in (anchor_distances, anchor_distances_reference):
        with pytest.raises(ValueError, match=fragment):
            run(*args)


def test_reads_the_device_once():
    case = make_case(7, 2)
    anchor_distances(*case)                       # first call builds the cached pointer tables
    with TorchCalls() as reads:
        anchor_distances(*case)
    assert reads.host_reads == ["tolist"]


def test_pool_matcher_equals_reference_match():
    """The server's matcher (anchor distances read in place from store slots) against the
    planner's reference on the same stored blocks."""
    from kvcomm_sglang.planner import reference_match
    from kvcomm_sglang.runtime_patch.runtime import pool_matcher
    from kvcomm_sglang.runtime_patch.segment_store import SegmentStore

    gen = torch.Generator().manual_seed(11)
    pool = TensorKVPool(2, 200, 2, 32, torch.bfloat16, device=DEVICE)

    class Allocator:
        alloc, free = pool.alloc, pool.free

    store = SegmentStore(pool, Allocator(), 199)

    def block(n):
        k, v = torch.randn(2, 2, n, 2, 32, generator=gen).to(DEVICE)
        return store.make(k, v, torch.zeros(n, dtype=torch.long))

    content, embs = block(9), [block(9), block(12), block(15)]
    got = pool_matcher(pool)(content, embs)
    want = reference_match(content, embs)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-4, rtol=1e-4)
