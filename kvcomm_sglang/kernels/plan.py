"""MaterializePlan: the flat work list every materialize backend executes.

One row per destination token, all requests of a batch concatenated. For layer l, token n,
head h, channel d (paper §4.3, in the de-rotated frame of DESIGN §4):

    Kt = K[l, src[n]] + [l >= l0] * sum_a wk(n, a, l, h, d) * K[l, dev[n, a]]
    K[l, dst[n]] = R(pos[n]) Kt
    V[l, dst[n]] = V[l, src[n]] + [l >= l0] * sum_a wv(n, a, l, h, d) * V[l, dev[n, a]]

with wk(n, a, l, h, d) = token_wk[n, a] when group[n] < 0 (content pieces: per-token weights)
and channel_wk[group[n], a, l, h, d] otherwise (template pieces: per-channel weights); the same
for V. dev[n, a] = -1 means anchor a adds nothing to token n. Base and deviation slots hold KV
in the position-0 frame, R is the model's unscaled RoPE (neox or GPT-J layout, ``is_neox``),
and l0 = first_corrected_layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MaterializePlan:
    dst_slots: torch.Tensor      # (N,) int64
    src_slots: torch.Tensor      # (N,) int64
    positions: torch.Tensor      # (N,) int64
    dev_slots: torch.Tensor      # (N, A) int64, -1 = none
    token_wk: torch.Tensor       # (N, A) fp32
    token_wv: torch.Tensor       # (N, A) fp32
    group: torch.Tensor          # (N,) int64, -1 = token weights
    channel_wk: torch.Tensor     # (G, A, L, H, D) fp32
    channel_wv: torch.Tensor     # (G, A, L, H, D) fp32
    first_corrected_layer: int = 1
    is_neox: bool = True         # RoPE layout: rotate-half (neox) or interleaved (GPT-J)

    @property
    def num_tokens(self) -> int:
        return int(self.dst_slots.shape[0])

    @property
    def num_anchors(self) -> int:
        return int(self.dev_slots.shape[1])

    def to(self, device) -> "MaterializePlan":
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                  for k, v in self.__dict__.items()}
        return MaterializePlan(**fields)

    @classmethod
    def rotation_only(cls, dst_slots, src_slots, positions, num_layers: int, num_heads: int,
                      head_dim: int, is_neox: bool = True) -> "MaterializePlan":
        """A plan with no anchors: gather, rotate to ``positions``, scatter."""
        n, dev = dst_slots.shape[0], dst_slots.device
        empty = torch.zeros(0, 0, num_layers, num_heads, head_dim, device=dev)
        return cls(dst_slots, src_slots, positions, torch.full((n, 0), -1, dtype=torch.long,
                   device=dev), torch.zeros(n, 0, device=dev), torch.zeros(n, 0, device=dev),
                   torch.full((n,), -1, dtype=torch.long, device=dev), empty, empty.clone(),
                   is_neox=is_neox)


def from_reuse_plan(reuse, dst_slots: torch.Tensor, slots_of, num_layers: int, num_heads: int,
                    head_dim: int, is_neox: bool = True,
                    first_corrected_layer: int = 1) -> MaterializePlan:
    """Flatten a core ``ReusePlan`` (de-rotated storage) into a MaterializePlan.

    ``slots_of(source)`` returns the (N,) pool slots holding a stored KV; sources are the pieces'
    ``StoredKV`` and ``(anchor, consumer, "content" | "template")`` deviations. ``dst_slots``
    covers every piece after x0, in prompt order.
    """
    device = dst_slots.device
    num_anchors = max((len(p.anchors) for p in reuse.pieces), default=0)
    cols = {"src": [], "pos": [], "dev": [], "twk": [], "twv": [], "group": []}
    channel_wk, channel_wv = [], []
    for piece in reuse.pieces:
        n = piece.source.length
        if bool(piece.source.positions.any()):
            raise ValueError("kernels materialize de-rotated storage only (derotated_storage=True)")
        cols["src"].append(slots_of(piece.source).to(device))
        cols["pos"].append(torch.arange(piece.start, piece.start + n, device=device))
        dev = torch.full((n, num_anchors), -1, dtype=torch.long, device=device)
        twk = torch.zeros(n, num_anchors, device=device)
        twv = torch.zeros(n, num_anchors, device=device)
        for a, anchor in enumerate(piece.anchors):
            dev[:, a] = slots_of((anchor, reuse.consumer, piece.kind)).to(device)[:n]
        group = torch.full((n,), -1, dtype=torch.long, device=device)
        if piece.kind == "content" and piece.anchors:
            twk[:, : len(piece.anchors)] = piece.weights_k[:, :n].T.to(device)
            twv[:, : len(piece.anchors)] = piece.weights_v[:, :n].T.to(device)
        elif piece.anchors:
            group[:] = len(channel_wk)
            channel_wk.append(_pad_anchors(piece.weights_k, num_anchors).to(device))
            channel_wv.append(_pad_anchors(piece.weights_v, num_anchors).to(device))
        cols["dev"].append(dev)
        cols["twk"].append(twk)
        cols["twv"].append(twv)
        cols["group"].append(group)
    empty = torch.zeros(0, num_anchors, num_layers, num_heads, head_dim, device=device)
    return MaterializePlan(
        dst_slots, torch.cat(cols["src"]), torch.cat(cols["pos"]), torch.cat(cols["dev"]),
        torch.cat(cols["twk"]).float(), torch.cat(cols["twv"]).float(), torch.cat(cols["group"]),
        torch.stack(channel_wk).float() if channel_wk else empty,
        torch.stack(channel_wv).float() if channel_wv else empty.clone(),
        first_corrected_layer, is_neox)


def _pad_anchors(weights: torch.Tensor, num_anchors: int) -> torch.Tensor:
    pad = num_anchors - weights.shape[0]
    return torch.cat([weights, weights.new_zeros((pad,) + tuple(weights.shape[1:]))]) if pad else weights


def check_plan(plan: MaterializePlan, pool, cos_sin: torch.Tensor) -> None:
    """Raise ValueError naming the first mismatch; never let a backend write out of bounds."""
    k0 = pool.k_buffer[0]
    num_layers, (num_slots, num_heads, head_dim) = len(pool.k_buffer), tuple(k0.shape)
    n, a = plan.num_tokens, plan.num_anchors
    _shape("dst_slots", plan.dst_slots, (n,))
    _shape("src_slots", plan.src_slots, (n,))
    _shape("positions", plan.positions, (n,))
    _shape("dev_slots", plan.dev_slots, (n, a))
    _shape("token_wk", plan.token_wk, (n, a))
    _shape("token_wv", plan.token_wv, (n, a))
    _shape("group", plan.group, (n,))
    g = plan.channel_wk.shape[0]
    _shape("channel_wk", plan.channel_wk, (g, a, num_layers, num_heads, head_dim))
    _shape("channel_wv", plan.channel_wv, (g, a, num_layers, num_heads, head_dim))
    for name in ("dst_slots", "src_slots", "positions", "dev_slots", "group"):
        _dtype(name, getattr(plan, name), (torch.int64, torch.int32))
    for name in ("token_wk", "token_wv", "channel_wk", "channel_wv"):
        _dtype(name, getattr(plan, name), (torch.float32,))
    for name, t in plan.__dict__.items():
        if isinstance(t, torch.Tensor) and t.device != k0.device:
            raise ValueError(f"plan.{name} is on {t.device}, the pool on {k0.device}")
    if cos_sin.device != k0.device or cos_sin.dtype != torch.float32 or cos_sin.dim() != 2:
        raise ValueError(f"cos_sin must be a 2-D fp32 table on {k0.device}, got "
                         f"{cos_sin.dtype} {tuple(cos_sin.shape)} on {cos_sin.device}")
    if cos_sin.shape[1] % 2 or cos_sin.shape[1] > head_dim:
        raise ValueError(f"cos_sin has {cos_sin.shape[1]} columns: must be even and <= head "
                         f"dim {head_dim}")
    for buf_name, bufs in (("k_buffer", pool.k_buffer), ("v_buffer", pool.v_buffer)):
        if len(bufs) != num_layers:
            raise ValueError(f"pool.{buf_name} has {len(bufs)} layers, expected {num_layers}")
        for layer, b in enumerate(bufs):
            if tuple(b.shape) != (num_slots, num_heads, head_dim) or b.dtype != k0.dtype:
                raise ValueError(f"pool.{buf_name}[{layer}] is {b.dtype} {tuple(b.shape)}, "
                                 f"expected {k0.dtype} {(num_slots, num_heads, head_dim)}")
            if b.stride(-1) != 1 or b.stride(-2) != head_dim:
                raise ValueError(f"pool.{buf_name}[{layer}] must be contiguous in (H, D)")
    if n == 0:
        return
    _range("dst_slots", plan.dst_slots, 0, num_slots)
    _range("src_slots", plan.src_slots, 0, num_slots)
    _range("positions", plan.positions, 0, cos_sin.shape[0])
    _range("group", plan.group, -1, g)
    if a:
        _range("dev_slots", plan.dev_slots, -1, num_slots)
    if torch.unique(plan.dst_slots).numel() != n:
        raise ValueError("dst_slots has duplicates: two tokens would write one slot")
    read = torch.cat([plan.src_slots, plan.dev_slots[plan.dev_slots >= 0]])
    if torch.isin(plan.dst_slots, read).any():
        raise ValueError("dst_slots overlap the source or deviation slots of the plan")
    if not (0 <= plan.first_corrected_layer <= num_layers):
        raise ValueError(f"first_corrected_layer {plan.first_corrected_layer} not in "
                         f"[0, {num_layers}]")


def _shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"plan.{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _dtype(name: str, t: torch.Tensor, dtypes: tuple) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"plan.{name} has dtype {t.dtype}, expected one of {dtypes}")


def _range(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    if int(t.min()) < lo or int(t.max()) >= hi:
        raise ValueError(f"plan.{name} has values in [{int(t.min())}, {int(t.max())}], "
                         f"allowed [{lo}, {hi})")
