"""RoPE re-rotation (spec §2.5): R(a) R(b) = R(a + b), so a key cached at position p moves to
position q by R(q - p), and a de-rotated key (position-0 frame, R(-p) K) lands at q by R(q).

Rotations are computed in fp64 angles and applied in fp32, then cast back; cos/sin are never
scaled (YaRN's mscale multiplies both the cached keys and the model's table, so a delta rotation
must be a pure rotation). Supported kinds: default, linear, llama3, yarn; neox (rotate-half) and
GPT-J (interleaved) layouts; partial rotary. Kinds whose angle is not linear in the position
(dynamic NTK, LongRoPE, MRoPE, dual-chunk) are refused with a ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_KINDS = ("default", "linear", "llama3", "yarn")
REFUSED_KINDS = {
    "dynamic": "dynamic NTK scaling changes the frequencies with the sequence length",
    "longrope": "LongRoPE switches frequency sets with the sequence length",
    "su": "LongRoPE (su) switches frequency sets with the sequence length",
    "mrope": "MRoPE uses 3-D positions",
    "default_mrope": "MRoPE uses 3-D positions",
    "dual_chunk": "dual-chunk attention rotates by chunk-relative positions",
}


@dataclass(frozen=True)
class RopeSpec:
    """What a delta rotation needs: ``inv_freq`` (R/2 floats), rotary dim R <= head dim D, layout."""

    head_dim: int
    rotary_dim: int
    inv_freq: tuple[float, ...]
    is_neox: bool = True
    kind: str = "default"
    mscale: float = 1.0  # YaRN attention factor baked into the model's cos/sin; never applied here

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], "
                             f"got {self.rotary_dim}")
        if len(self.inv_freq) != self.rotary_dim // 2:
            raise ValueError(f"inv_freq has {len(self.inv_freq)} entries, rotary_dim "
                             f"{self.rotary_dim} needs {self.rotary_dim // 2}")

    @classmethod
    def build(cls, head_dim: int, base: float, rotary_dim: int | None = None,
              scaling: dict | None = None, is_neox: bool = True) -> "RopeSpec":
        """Frequencies computed in fp32 exactly as transformers and SGLang compute them."""
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if base <= 0:
            raise ValueError(f"rope base (theta) must be > 0, got {base}")
        if rotary_dim <= 0 or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and > 0, got {rotary_dim}")
        kind = _scaling_kind(scaling)
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        inv = 1.0 / (base ** exponents)
        mscale = 1.0
        if kind == "linear":
            inv = inv / _need(scaling, "factor")
        elif kind == "llama3":
            inv = _llama3(inv, scaling)
        elif kind == "yarn":
            inv, mscale = _yarn(base, rotary_dim, scaling)
        return cls(head_dim, rotary_dim, tuple(inv.tolist()), is_neox, kind, mscale)

    @classmethod
    def from_hf_config(cls, config) -> "RopeSpec":
        """Read a transformers ``PretrainedConfig`` (``rope_parameters`` or ``rope_scaling``)."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        scaling = getattr(config, "rope_scaling", None) or params or None
        base = params.get("rope_theta", getattr(config, "rope_theta", None))
        if base is None:
            raise ValueError("model config has no rope_theta: not a RoPE model")
        head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        rotary_dim = int(head_dim * factor)
        return cls.build(head_dim, float(base), rotary_dim, scaling, is_neox=True)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (N,) integer, may be negative -> angles (N, R/2) fp64."""
        inv = torch.tensor(self.inv_freq, dtype=torch.float64, device=positions.device)
        return positions.to(torch.float64)[:, None] * inv[None, :]

    def cos_sin_table(self, num_positions: int, device=None) -> torch.Tensor:
        """SGLang's layout: (P, R) fp32, cos half then sin half, unscaled."""
        ang = self.angles(torch.arange(num_positions, device=device))
        return torch.cat([ang.cos(), ang.sin()], dim=-1).to(torch.float32)


def rotate(k: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Apply R(positions[n]) to k (..., N, H, D) -> same shape and dtype. Values never rotate."""
    if k.shape[-1] != spec.head_dim:
        raise ValueError(f"key head dim {k.shape[-1]} != RopeSpec.head_dim {spec.head_dim}")
    if positions.dim() != 1 or positions.shape[0] != k.shape[-3]:
        raise ValueError(f"positions must be (N,) with N={k.shape[-3]}, got {tuple(positions.shape)}")
    ang = spec.angles(positions.to(k.device))
    cos, sin = ang.cos().to(torch.float32)[:, None, :], ang.sin().to(torch.float32)[:, None, :]
    return apply_cos_sin(k, cos, sin, spec.rotary_dim, spec.is_neox)


def apply_cos_sin(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                  is_neox: bool) -> torch.Tensor:
    """k (..., N, H, D); cos, sin broadcastable to (N, H, R/2). Computes in fp32, returns k.dtype."""
    x = k.to(torch.float32)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox:
        x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if is_neox:
        out = torch.cat([y1, y2], dim=-1)
    else:
        out = torch.stack([y1, y2], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1).to(k.dtype)


def _scaling_kind(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind in REFUSED_KINDS:
        raise ValueError(f"RoPE kind {kind!r} cannot be re-rotated exactly: "
                         f"{REFUSED_KINDS[kind]}")
    if kind not in SUPPORTED_KINDS:
        raise ValueError(f"unknown RoPE kind {kind!r}; supported: {SUPPORTED_KINDS}")
    return kind


def _need(scaling: dict, key: str) -> float:
    if key not in scaling:
        raise ValueError(f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r} "
                         f"needs {key!r}")
    return float(scaling[key])


def _llama3(inv: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor, low = _need(scaling, "factor"), _need(scaling, "low_freq_factor")
    high = _need(scaling, "high_freq_factor")
    old_len = _need(scaling, "original_max_position_embeddings")
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(base: float, dim: int, scaling: dict) -> tuple[torch.Tensor, float]:
    factor = _need(scaling, "factor")
    old_len = _need(scaling, "original_max_position_embeddings")
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp                      # share of the extrapolated (unscaled) frequency
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv, _yarn_mscale(factor, scaling)


def _yarn_mscale(factor: float, scaling: dict) -> float:
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def get(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    return get(factor, m) / get(factor, m_all) if m and m_all else get(factor)
