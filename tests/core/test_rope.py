"""Spec T1 (RoPE shift exactness), RoPE kinds, layouts, partial rotary, refusals."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kvcomm_sglang.rope import RopeSpec, apply_cos_sin, rotate

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
KINDS = [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3, YARN]


def exact_rotation(k, positions, spec):
    """Independent fp64 reference: complex multiplication by exp(i * p * theta)."""
    r = spec.rotary_dim
    x = k.double()
    if spec.is_neox:
        z = torch.complex(x[..., : r // 2], x[..., r // 2: r])
    else:
        z = torch.complex(x[..., 0:r:2], x[..., 1:r:2])
    ang = positions.double()[:, None, None] * torch.tensor(spec.inv_freq, dtype=torch.float64)
    z = z * torch.exp(1j * ang)
    rot = torch.cat([z.real, z.imag], -1) if spec.is_neox else \
        torch.stack([z.real, z.imag], -1).flatten(-2)
    return torch.cat([rot, x[..., r:]], -1)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("scaling", KINDS, ids=["default", "linear", "llama3", "yarn"])
@pytest.mark.parametrize("offset", [-37, 0, 17, 4096])
@pytest.mark.parametrize("is_neox", [True, False])
def test_t1_shift_equals_rotation_at_new_position(scaling, offset, is_neox):
    torch.manual_seed(1)
    spec = RopeSpec.build(64, 500000.0, scaling=scaling, is_neox=is_neox)
    k = torch.randn(4, 37, 2, 64)                       # (L, N, H, D)
    p = torch.arange(37, 74)
    at_p = exact_rotation(k, p, spec).float()
    shifted = rotate(at_p, torch.full((37,), offset), spec)
    assert rel(shifted, exact_rotation(k, p + offset, spec)) < 1e-5


def test_t1_composition_and_inverse():
    torch.manual_seed(2)
    spec = RopeSpec.build(32, 10000.0, scaling=LLAMA3)
    k = torch.randn(2, 11, 3, 32)
    o1, o2 = torch.randint(-500, 500, (11,)), torch.randint(-500, 500, (11,))
    assert rel(rotate(rotate(k, o1, spec), o2, spec), rotate(k, o1 + o2, spec)) < 1e-5
    assert rel(rotate(rotate(k, o1, spec), -o1, spec), k) < 1e-6


def test_partial_rotary_leaves_tail_channels():
    torch.manual_seed(3)
    spec = RopeSpec.build(64, 10000.0, rotary_dim=16)
    k = torch.randn(2, 5, 2, 64)
    out = rotate(k, torch.arange(5) + 100, spec)
    assert torch.equal(out[..., 16:], k[..., 16:])
    assert rel(out, exact_rotation(k, torch.arange(5) + 100, spec)) < 1e-6
    assert not torch.allclose(out[..., :16], k[..., :16])


@pytest.mark.parametrize("scaling", KINDS[1:], ids=["linear", "llama3", "yarn"])
def test_frequencies_match_transformers_bit_for_bit(scaling):
    params = dict(scaling, rope_theta=500000.0)
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                      rope_parameters=params, max_position_embeddings=16384)
    inv, attention = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    spec = RopeSpec.from_hf_config(cfg)
    assert torch.equal(torch.tensor(spec.inv_freq, dtype=torch.float32), inv)
    assert math.isclose(spec.mscale, attention)


def test_yarn_mscale_is_not_applied_to_delta_rotation():
    spec = RopeSpec.build(32, 10000.0, scaling=YARN)
    assert spec.mscale > 1.0
    k = torch.randn(1, 3, 1, 32)
    out = rotate(k, torch.tensor([5, 6, 7]), spec)
    assert math.isclose(float(out.norm()), float(k.norm()), rel_tol=1e-5)  # pure rotation


def test_cos_sin_table_layout():
    spec = RopeSpec.build(16, 10000.0)
    table = spec.cos_sin_table(10)
    assert table.shape == (10, 16) and table.dtype == torch.float32
    k = torch.randn(1, 10, 2, 16)
    via_table = apply_cos_sin(k, table[:, None, :8], table[:, None, 8:], 16, True)
    assert rel(via_table, rotate(k, torch.arange(10), spec)) < 1e-6


@pytest.mark.parametrize("kind", ["dynamic", "longrope", "mrope", "dual_chunk"])
def test_refuses_kinds_it_cannot_rotate_exactly(kind):
    with pytest.raises(ValueError, match="cannot be re-rotated exactly"):
        RopeSpec.build(64, 10000.0, scaling={"rope_type": kind, "factor": 2.0})


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="unknown RoPE kind"):
        RopeSpec.build(64, 10000.0, scaling={"rope_type": "wavy"})
    with pytest.raises(ValueError, match="rotary_dim"):
        RopeSpec.build(64, 10000.0, rotary_dim=7)
    with pytest.raises(ValueError, match="needs 'factor'"):
        RopeSpec.build(64, 10000.0, scaling={"rope_type": "linear"})
    spec = RopeSpec.build(64, 10000.0)
    with pytest.raises(ValueError, match="head dim"):
        rotate(torch.randn(1, 3, 1, 32), torch.arange(3), spec)
    with pytest.raises(ValueError, match="positions must be"):
        rotate(torch.randn(1, 3, 1, 64), torch.arange(4), spec)
