"""The segment store: stored KV blocks (template pieces, message bases, anchor embeddings and
deviations) kept in slots of SGLang's own KV pool.

Every slot the store holds is allocated from the server's token allocator and counted as
evictable in the radix cache's sizes, so SGLang's idle memory check balances; under memory
pressure the cache evicts whole store entries (runtime.KVCommRuntime.evict).
"""

from __future__ import annotations

import torch

from kvcomm_sglang.kvblock import check_kv
from kvcomm_sglang.rope import RopeSpec, rotate


class StoreFull(RuntimeError):
    """The store could not get slots (pool exhausted or over its budget)."""


class PoolKV:
    """A stored block living in pool slots. ``k``/``v`` gather (L, N, H, D) on demand."""

    def __init__(self, store: "SegmentStore", slots: torch.Tensor, positions: torch.Tensor):
        self.store, self.slots, self.positions = store, slots, positions.cpu()
        self.slots_np = slots.cpu().numpy()   # plans are built on the host: no sync per request
        self.derotated = not bool(self.positions.any())
        self.freed = False

    @property
    def length(self) -> int:
        return len(self.slots_np)       # host data: no torch call per piece of a plan

    @property
    def nbytes(self) -> int:
        return self.length * self.store.bytes_per_token

    @property
    def k(self) -> torch.Tensor:
        return self.store.gather(self.store.pool.k_buffer, self.slots)

    @property
    def v(self) -> torch.Tensor:
        return self.store.gather(self.store.pool.v_buffer, self.slots)

    def keys_at(self, positions: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
        return rotate(self.k, positions - self.positions.to(positions.device), rope)


class SegmentStore:
    """Allocates, writes, reads and frees store slots in ``pool`` through ``allocator``."""

    def __init__(self, pool, allocator, max_tokens: int, make_room=None, make_budget=None):
        self.pool, self.allocator, self.max_tokens = pool, allocator, max_tokens
        self.make_room = make_room              # callable(n) -> frees up to n tree tokens
        self.make_budget = make_budget          # callable(n) -> frees up to n store tokens
        self.tokens = 0
        k0 = pool.k_buffer[0]
        self.device, self.dtype = k0.device, k0.dtype
        self.bytes_per_token = 2 * len(pool.k_buffer) * k0.shape[1] * k0.shape[2] * k0.element_size()

    def make(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> PoolKV:
        """The core's block factory: copy k, v (L, N, H, D) into fresh store slots."""
        check_kv(k, v, positions)
        n = int(k.shape[1])
        slots = self.alloc(n)
        for layer, (kb, vb) in enumerate(zip(self.pool.k_buffer, self.pool.v_buffer)):
            kb[slots] = k[layer].to(device=self.device, dtype=self.dtype)
            vb[slots] = v[layer].to(device=self.device, dtype=self.dtype)
        return PoolKV(self, slots, positions)

    def alloc(self, n: int) -> torch.Tensor:
        if self.tokens + n > self.max_tokens and self.make_budget is not None and n <= self.max_tokens:
            self.make_budget(self.tokens + n - self.max_tokens)
        if self.tokens + n > self.max_tokens:
            raise StoreFull(f"store budget: {self.tokens} + {n} > {self.max_tokens} tokens")
        slots = self.allocator.alloc(n) if n else torch.empty(0, dtype=torch.int64, device=self.device)
        if slots is None and self.make_room is not None:
            self.make_room(n)
            slots = self.allocator.alloc(n)
        if slots is None:
            raise StoreFull(f"KV pool has no {n} free slots for the store")
        self.tokens += n
        return slots.to(torch.int64)

    def free(self, block: PoolKV) -> None:
        if block.freed:
            return
        block.freed = True
        if block.length:
            self.allocator.free(block.slots)
        self.tokens -= block.length

    def gather(self, buffers, slots: torch.Tensor) -> torch.Tensor:
        return torch.stack([b[slots] for b in buffers])
