"""materialize_cpu (the CPU server's materialize) vs the torch reference on fresh random inputs:
pools, plans with content and template rows, padded anchors, every dtype and RoPE layout."""

import pytest
import torch

from kvcomm_sglang.kernels import MaterializePlan, materialize
from kvcomm_sglang.kernels.cpu_materialize import materialize_cpu
from tests.kernels.test_materialize import _bad_inputs, clone_pool, make_case, run_and_compare


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("n_tokens", [1, 7, 33])
@pytest.mark.parametrize("n_anchors", [0, 1, 3])
def test_cpu_matches_reference(dtype, is_neox, n_tokens, n_anchors):
    case = make_case(n_tokens, n_anchors, dtype, is_neox, seed=100 + n_tokens * 10 + n_anchors)
    run_and_compare(materialize_cpu, *case)


@pytest.mark.parametrize("seed", range(4))
def test_cpu_matches_reference_on_the_servers_shape(seed):
    """SmolLM2's KV (30 layers, 3 heads, dim 64, bf16), many content rows, a few template rows,
    up to 8 anchors of which some are padded (dev = -1)."""
    gen = torch.Generator().manual_seed(seed)
    anchors = int(torch.randint(2, 9, (1,), generator=gen))
    plan, pool, cos_sin = make_case(60, anchors, torch.bfloat16, heads=3, head_dim=64,
                                    num_layers=30, num_slots=1200, seed=1000 + seed)
    plan.group[: 2 * plan.num_tokens // 3] = -1           # most rows are content rows
    run_and_compare(materialize_cpu, plan, pool, cos_sin)


@pytest.mark.parametrize("rotary_dim,first_corrected", [(16, 0), (8, 1), (32, 3)])
def test_cpu_partial_rotary_and_first_corrected_layer(rotary_dim, first_corrected):
    case = make_case(33, 3, torch.float32, False, rotary_dim, first_corrected=first_corrected,
                     seed=rotary_dim + first_corrected)
    run_and_compare(materialize_cpu, *case)


def test_only_template_rows_and_only_content_rows():
    plan, pool, cos_sin = make_case(12, 3, seed=7)
    for group in (torch.zeros_like(plan.group), torch.full_like(plan.group, -1)):
        run_and_compare(materialize_cpu, MaterializePlan(**{**plan.__dict__, "group": group}),
                        clone_pool(pool), cos_sin)


def test_auto_backend_on_cpu_is_the_cpu_path_and_empty_plans_write_nothing():
    plan, pool, cos_sin = make_case(7, 2, seed=3)
    run_and_compare(lambda *a: materialize(*a, backend="auto"), plan, pool, cos_sin)
    empty = MaterializePlan(*(getattr(plan, f)[:0] for f in ("dst_slots", "src_slots",
                            "positions", "dev_slots", "token_wk", "token_wv", "group")),
                            plan.channel_wk, plan.channel_wv)
    before = clone_pool(pool)
    materialize_cpu(empty, pool, cos_sin)
    assert all(torch.equal(a, b) for a, b in zip(pool.k_buffer + pool.v_buffer,
                                                 before.k_buffer + before.v_buffer))


@pytest.mark.parametrize("name", ["dst out of range", "dev out of range", "dst overlaps src",
                                  "duplicate dst", "channel weights shape",
                                  "position beyond table"])
def test_cpu_refuses_what_the_reference_refuses(name):
    plan, pool, cos_sin, fragment = _bad_inputs(*make_case(7, 3, seed=11))[name]
    before = clone_pool(pool)
    with pytest.raises(ValueError, match=fragment):
        materialize_cpu(plan, pool, cos_sin)
    assert all(torch.equal(a, b) for a, b in zip(pool.k_buffer, before.k_buffer))
