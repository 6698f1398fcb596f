"""materialize: Triton (interpreted on CPU, compiled on CUDA) and FlashInfer vs the torch reference,
and the reference vs an independent per-token fp64 loop (paper §4.3 offsets, §2.5 rotation)."""

import pytest
import torch

from kvcomm_sglang.kernels import MaterializePlan, TensorKVPool, materialize, materialize_reference
from kvcomm_sglang.kernels import triton_materialize
from kvcomm_sglang.kernels.flashinfer_rope import materialize_flashinfer
from kvcomm_sglang.kernels.triton_materialize import materialize_triton
from kvcomm_sglang.rope import RopeSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: interpreted (see conftest.py)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}
NUM_POSITIONS = 256
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def make_case(n_tokens=7, n_anchors=3, dtype=torch.float32, is_neox=True, rotary_dim=None,
              heads=2, head_dim=32, num_layers=3, num_slots=200, first_corrected=1, seed=0):
    """Random pool + a plan of up to 3 requests, each 2/3 content rows then template rows."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    pool = TensorKVPool(num_layers, num_slots, heads, head_dim, dtype, device=DEVICE)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.copy_(randn(*buf.shape).to(dtype))
    slots = torch.randperm(num_slots - 1, generator=gen) + 1
    dst, readable = slots[:n_tokens], slots[n_tokens:]
    src = readable[torch.randint(len(readable), (n_tokens,), generator=gen)]
    dev = readable[torch.randint(len(readable), (n_tokens, n_anchors), generator=gen)]
    dev[torch.rand(n_tokens, n_anchors, generator=gen) < 0.2] = -1
    num_requests = min(3, n_tokens)
    group, positions = torch.full((n_tokens,), -1), torch.empty(n_tokens, dtype=torch.long)
    for r, rows in enumerate(torch.arange(n_tokens).chunk(num_requests)):
        start = int(torch.randint(NUM_POSITIONS - len(rows), (1,), generator=gen))
        positions[rows] = start + torch.arange(len(rows))
        group[rows[(2 * len(rows) + 2) // 3:]] = r
    chan = (num_requests, n_anchors, num_layers, heads, head_dim)
    plan = MaterializePlan(dst, src, positions, dev, randn(n_tokens, n_anchors).softmax(-1),
                           randn(n_tokens, n_anchors).softmax(-1), group, randn(*chan).softmax(1),
                           randn(*chan).softmax(1), first_corrected, is_neox).to(DEVICE)
    spec = RopeSpec.build(head_dim, 10000.0, rotary_dim, is_neox=is_neox)
    return plan, pool, spec.cos_sin_table(NUM_POSITIONS, device=DEVICE)


def clone_pool(pool):
    out = TensorKVPool.__new__(TensorKVPool)
    out.k_buffer = [b.clone() for b in pool.k_buffer]
    out.v_buffer = [b.clone() for b in pool.v_buffer]
    return out


def run_and_compare(run, plan, pool, cos_sin, tol_scale=1.0):
    """Poison the dst slots, run ``run`` and the reference on copies, check every slot."""
    for buf in pool.k_buffer + pool.v_buffer:
        buf[plan.dst_slots] = float("nan")
    before, expected = clone_pool(pool), clone_pool(pool)
    materialize_reference(plan, expected, cos_sin)
    run(plan, pool, cos_sin)
    untouched = torch.ones(pool.k_buffer[0].shape[0], dtype=torch.bool, device=DEVICE)
    untouched[plan.dst_slots] = False
    for got, want, old in zip(pool.k_buffer + pool.v_buffer, expected.k_buffer + expected.v_buffer,
                              before.k_buffer + before.v_buffer):
        assert torch.isfinite(want[plan.dst_slots]).all()
        torch.testing.assert_close(got[plan.dst_slots].float(), want[plan.dst_slots].float(),
                                   **{k: t * tol_scale for k, t in TOL[got.dtype].items()})
        assert torch.equal(got[untouched], old[untouched]), "a slot outside dst_slots changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("n_tokens", [1, 7, 33])
@pytest.mark.parametrize("n_anchors", [0, 1, 3])
def test_triton_matches_reference(dtype, is_neox, n_tokens, n_anchors):
    case = make_case(n_tokens, n_anchors, dtype, is_neox, seed=n_tokens * 10 + n_anchors)
    run_and_compare(materialize_triton, *case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("heads,head_dim,rotary_dim", [(2, 32, 16), (3, 24, 8), (3, 24, 24)])
def test_triton_partial_rotary_and_odd_heads(dtype, is_neox, heads, head_dim, rotary_dim):
    case = make_case(33, 3, dtype, is_neox, rotary_dim, heads=heads, head_dim=head_dim)
    run_and_compare(materialize_triton, *case)


@pytest.mark.parametrize("first_corrected", [0, 1, 3])
def test_triton_first_corrected_layer(first_corrected):
    run_and_compare(materialize_triton, *make_case(7, 3, first_corrected=first_corrected))


@pytest.mark.parametrize("is_neox", [True, False])
def test_triton_many_small_blocks(monkeypatch, is_neox):
    """Tiny tiles: one head and one token per program, so head and token blocks are masked."""
    monkeypatch.setattr(triton_materialize, "_TILES", ((32, 1), (32, 1)))
    case = make_case(7, 3, torch.float16, is_neox, 16, heads=3, head_dim=24)
    run_and_compare(materialize_triton, *case)
    run_and_compare(lambda *a: materialize_triton(*a, block_n=4), *make_case(33, 1, seed=5))


def test_triton_rotation_only_and_dispatch():
    _, pool, cos_sin = make_case(7, 0)
    dst, src = torch.arange(150, 157, device=DEVICE), torch.arange(10, 17, device=DEVICE)
    plan = MaterializePlan.rotation_only(dst, src, torch.arange(7, device=DEVICE) * 30, 3, 2, 32)
    run_and_compare(lambda *a: materialize(*a, backend="triton"), plan, pool, cos_sin)


def test_triton_empty_plan_is_a_no_op():
    plan, pool, cos_sin = make_case(7, 2)
    empty = MaterializePlan(*(getattr(plan, f)[:0] for f in ("dst_slots", "src_slots",
                            "positions", "dev_slots", "token_wk", "token_wv", "group")),
                            plan.channel_wk, plan.channel_wv)
    before = clone_pool(pool)
    materialize_triton(empty, pool, cos_sin)
    assert all(torch.equal(a, b) for a, b in zip(pool.k_buffer, before.k_buffer))


def _naive(plan, pool, cos_sin):
    """Independent fp64 per-token loop of the formula in kernels/plan.py -> k, v (L, N, H, D)."""
    half, cs = cos_sin.shape[1] // 2, cos_sin.double()
    out_k, out_v = [], []
    for layer, (kb, vb) in enumerate(zip(pool.k_buffer, pool.v_buffer)):
        ks, vs = [], []
        for n in range(plan.num_tokens):
            k, v = kb[plan.src_slots[n]].double(), vb[plan.src_slots[n]].double()
            for a in range(plan.num_anchors if layer >= plan.first_corrected_layer else 0):
                slot, g = int(plan.dev_slots[n, a]), int(plan.group[n])
                if slot < 0:
                    continue
                wk = plan.token_wk[n, a] if g < 0 else plan.channel_wk[g, a, layer]
                wv = plan.token_wv[n, a] if g < 0 else plan.channel_wv[g, a, layer]
                k, v = k + wk.double() * kb[slot].double(), v + wv.double() * vb[slot].double()
            rotated = k.clone()
            for j in range(half):
                i1, i2 = (j, j + half) if plan.is_neox else (2 * j, 2 * j + 1)
                c, s = cs[plan.positions[n], j], cs[plan.positions[n], half + j]
                rotated[:, i1] = k[:, i1] * c - k[:, i2] * s
                rotated[:, i2] = k[:, i2] * c + k[:, i1] * s
            ks.append(rotated)
            vs.append(v)
        out_k.append(torch.stack(ks))
        out_v.append(torch.stack(vs))
    return torch.stack(out_k), torch.stack(out_v)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_reference_and_triton_match_naive_fp64_loop(is_neox, rotary_dim):
    plan, pool, cos_sin = make_case(5, 2, torch.float32, is_neox, rotary_dim, head_dim=16)
    want_k, want_v = _naive(plan, pool, cos_sin)
    for run in (materialize_reference, materialize_triton):
        out = clone_pool(pool)
        run(plan, out, cos_sin)
        got_k, got_v = out.read(plan.dst_slots)
        torch.testing.assert_close(got_k.double(), want_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_v.double(), want_v, atol=1e-5, rtol=1e-5)


def _bad_inputs(plan, pool, cos_sin):
    """name -> (plan, pool, cos_sin, message fragment) of inputs the launcher must refuse."""
    n, slots = plan.num_tokens, pool.k_buffer[0].shape[0]
    with_ = lambda **kw: MaterializePlan(**{**plan.__dict__, **kw})  # noqa: E731
    f64_pool = clone_pool(pool)
    f64_pool.k_buffer = [b.double() for b in f64_pool.k_buffer]
    f64_pool.v_buffer = [b.double() for b in f64_pool.v_buffer]
    wide = torch.zeros(slots, 2 * 32 + 16, device=DEVICE)
    strided_pool = clone_pool(pool)
    strided_pool.k_buffer[1] = wide[:, :64].view(slots, 2, 32)
    cases = [
        ("token weights shape", with_(token_wk=plan.token_wk[:, :1]), pool, cos_sin, "token_wk"),
        ("channel weights shape", with_(channel_wv=plan.channel_wv[..., :8]), pool, cos_sin,
         "channel_wv"),
        ("src shape", with_(src_slots=plan.src_slots[:-1]), pool, cos_sin, "src_slots"),
        ("weights dtype", with_(token_wv=plan.token_wv.double()), pool, cos_sin, "token_wv"),
        ("positions dtype", with_(positions=plan.positions.float()), pool, cos_sin, "positions"),
        ("pool dtype", plan, f64_pool, cos_sin, "dtype"),
        ("slot stride", plan, strided_pool, cos_sin, "stride"),
        ("cos_sin dtype", plan, pool, cos_sin.double(), "cos_sin"),
        ("dst out of range", with_(dst_slots=plan.dst_slots.clone().fill_(slots)), pool, cos_sin,
         "dst_slots"),
        ("dev out of range", with_(dev_slots=plan.dev_slots.clone().fill_(-2)), pool, cos_sin,
         "dev_slots"),
        ("group out of range", with_(group=plan.group.clone().fill_(9)), pool, cos_sin, "group"),
        ("dst overlaps src", with_(src_slots=plan.dst_slots.roll(1)), pool, cos_sin, "overlap"),
        ("dst overlaps dev", with_(dev_slots=plan.dst_slots[:, None].expand(n, 2).contiguous()),
         pool, cos_sin, "overlap"),
        ("duplicate dst", with_(dst_slots=plan.dst_slots.clone().fill_(int(plan.dst_slots[0]))),
         pool, cos_sin, "duplicates"),
        ("position beyond table", plan, pool, cos_sin[: int(plan.positions.max())], "positions"),
        ("first corrected layer", with_(first_corrected_layer=4), pool, cos_sin,
         "first_corrected_layer"),
    ]
    return {name: rest for name, *rest in cases}


BAD_INPUTS = ("token weights shape", "channel weights shape", "src shape", "weights dtype",
              "positions dtype", "pool dtype", "slot stride", "cos_sin dtype", "dst out of range",
              "dev out of range", "group out of range", "dst overlaps src", "dst overlaps dev",
              "duplicate dst", "position beyond table", "first corrected layer")


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_triton_refuses_bad_input_without_writing(name):
    plan, pool, cos_sin = make_case(7, 2)
    bad_plan, bad_pool, bad_table, fragment = _bad_inputs(plan, pool, cos_sin)[name]
    before = clone_pool(bad_pool)
    with pytest.raises(ValueError, match=fragment):
        materialize_triton(bad_plan, bad_pool, bad_table)
    for a, b in zip(bad_pool.k_buffer + bad_pool.v_buffer, before.k_buffer + before.v_buffer):
        assert torch.equal(a, b), f"{name}: pool changed although the plan was refused"


def test_triton_guard_masks_every_store():
    """A non-zero validator count reaching the kernel writes nothing, on a plan that is fine."""
    plan, pool, cos_sin = make_case(9, 2)
    before = clone_pool(pool)
    tables = triton_materialize._pool_info(pool)
    guard = torch.ones(1, dtype=torch.int32, device=DEVICE)
    triton_materialize._launch(plan, pool, cos_sin, guard, *tables)
    for a, b in zip(pool.k_buffer + pool.v_buffer, before.k_buffer + before.v_buffer):
        assert torch.equal(a, b)
    triton_materialize._launch(plan, pool, cos_sin, guard.zero_(), *tables)
    assert not torch.equal(pool.k_buffer[1][plan.dst_slots], before.k_buffer[1][plan.dst_slots])


def test_triton_guard_on_an_invalid_plan_reads_in_bounds_and_writes_nothing():
    """Indices far out of every range (the validator's count is then non-zero): the kernel
    stores nothing, and its clamped loads stay in the tables (on CUDA a read 10 pools away
    would raise an illegal-address error; the interpreter does not check reads)."""
    plan, pool, cos_sin = make_case(9, 2)
    slots = pool.k_buffer[0].shape[0]
    bad = MaterializePlan(**{**plan.__dict__, "dst_slots": plan.dst_slots + 10 * slots,
                             "src_slots": plan.src_slots - 10 * slots,
                             "positions": plan.positions + 10 * cos_sin.shape[0],
                             "dev_slots": plan.dev_slots.clamp(min=0) + 10 * slots,
                             "group": plan.group.clamp(min=0) + 7})
    before = clone_pool(pool)
    guard = torch.ones(1, dtype=torch.int32, device=DEVICE)
    triton_materialize._launch(bad, pool, cos_sin, guard, *triton_materialize._pool_info(pool))
    for a, b in zip(pool.k_buffer + pool.v_buffer, before.k_buffer + before.v_buffer):
        assert torch.equal(a, b)


def test_triton_reads_the_device_once_after_the_launch(monkeypatch):
    """Validation costs no extra round trip: the single host read follows the kernel launch."""
    from tests.torch_calls import TorchCalls

    plan, pool, cos_sin = make_case(9, 2)
    events, launch = [], triton_materialize._launch
    monkeypatch.setattr(triton_materialize, "_launch",
                        lambda *a, **k: (events.append("launch"), launch(*a, **k))[1])
    with TorchCalls() as reads:
        reads.host_reads = events     # one ordered log of launches and host reads
        materialize_triton(plan, pool, cos_sin)
    assert events == ["launch", "item"]


def test_flashinfer_refuses_cpu_or_fp32():
    plan, pool, cos_sin = make_case(7, 2, torch.float32)
    with pytest.raises(ValueError, match="CUDA|fp16|bf16"):
        materialize_flashinfer(plan, pool, cos_sin)


@pytest.mark.skipif(DEVICE != "cuda", reason="FlashInfer needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_dim,rotary_dim", [(128, 128), (128, 64), (64, 64)])
def test_flashinfer_matches_reference(dtype, is_neox, head_dim, rotary_dim):
    pytest.importorskip("flashinfer")
    plan, pool, cos_sin = make_case(33, 3, dtype, is_neox, rotary_dim, head_dim=head_dim)
    # FlashInfer rotates the stored (rounded) sum: two roundings where the reference has one.
    run_and_compare(materialize_flashinfer, plan, pool, cos_sin, tol_scale=2.0)
