"""TensorKVPool: a minimal token-slot KV pool with SGLang's per-layer layout.

``k_buffer[l]``, ``v_buffer[l]``: (slots, H, D). Slot 0 is reserved, as in SGLang. Used by the
tests and the transformers harness; inside SGLang the server's own ``MHATokenToKVPool`` plays
this role.
"""

from __future__ import annotations

import torch


class TensorKVPool:
    def __init__(self, num_layers: int, num_slots: int, num_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        if min(num_layers, num_slots, num_heads, head_dim) <= 0:
            raise ValueError("TensorKVPool sizes must be positive")
        shape = (num_slots, num_heads, head_dim)
        self.k_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free = list(range(num_slots - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > len(self._free):
            raise MemoryError(f"pool has {len(self._free)} free slots, {n} requested")
        slots = [self._free.pop() for _ in range(n)]
        return torch.tensor(slots, dtype=torch.long, device=self.k_buffer[0].device)

    def free(self, slots: torch.Tensor) -> None:
        self._free.extend(int(s) for s in slots.tolist())

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (L, N, H, D) -> slots (N,)."""
        for layer, (kb, vb) in enumerate(zip(self.k_buffer, self.v_buffer)):
            kb[slots] = k[layer].to(kb.dtype)
            vb[slots] = v[layer].to(vb.dtype)

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (N,) -> k, v (L, N, H, D)."""
        return (torch.stack([kb[slots] for kb in self.k_buffer]),
                torch.stack([vb[slots] for vb in self.v_buffer]))
