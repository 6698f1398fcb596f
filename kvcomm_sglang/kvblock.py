"""StoredKV: the KV of one stored piece (a template piece, a content's base, an anchor deviation).

``k, v`` are (L, N, H, D); ``positions`` (N,) says where each key is rotated to (all zeros in the
de-rotated frame). The core builds every stored block through a factory with this signature, so
a server can keep blocks in its own KV pool (runtime_patch.segment_store.PoolKV).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcomm_sglang.rope import RopeSpec, rotate


@dataclass
class StoredKV:
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor

    def __post_init__(self) -> None:
        check_kv(self.k, self.v, self.positions)

    @property
    def length(self) -> int:
        return int(self.k.shape[1])

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def keys_at(self, positions: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
        return rotate(self.k, positions - self.positions.to(positions.device), rope)


def check_kv(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"stored K {tuple(k.shape)} and V {tuple(v.shape)} must be one "
                         "(L, N, H, D) shape")
    if positions.shape != (k.shape[1],):
        raise ValueError(f"positions {tuple(positions.shape)} do not match {k.shape[1]} tokens")
