"""The segment store: stored KV blocks (template pieces, message bases, anchor embeddings and
deviations) kept in slots of SGLang's own KV pool.

Ownership (DESIGN §4, "one owner per slot"): every slot the store allocates belongs to exactly
one ``PoolKV`` block from ``make`` to ``free``, and every block belongs to one owner (a workflow
namespace) in the store's ledger. A block lives while its owner's state can reach it; the owner
calls ``sweep`` with what it reaches after every change, and the store frees the rest. So no
path that drops a reference (a message bound twice, a half-built template, an anchor whose
embedding is replaced, an evicted anchor) can orphan a slot: blocks made inside an open
``building`` scope are kept until the scope ends, then swept like any other.

Every slot the store holds is counted as evictable in the radix cache's sizes, so SGLang's idle
memory check balances; the store holds at most ``max_tokens`` slots, an owner at most
``quota_tokens``; over either, ``make_budget(owner, n)`` is asked to free room first.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch

from kvcomm_sglang.kvblock import check_kv
from kvcomm_sglang.rope import RopeSpec, rotate


class StoreFull(RuntimeError):
    """The store could not get slots (pool exhausted, over its budget or the owner's quota)."""


class PoolKV:
    """A stored block living in pool slots. ``k``/``v`` gather (L, N, H, D) on demand."""

    def __init__(self, store: "SegmentStore", slots: torch.Tensor, positions: torch.Tensor,
                 owner: str = ""):
        self.store, self.slots, self.positions = store, slots, positions.cpu()
        self.slots_np = slots.cpu().numpy()   # plans are built on the host: no sync per request
        self.derotated = not bool(self.positions.any())
        self.owner = owner
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

    def __init__(self, pool, allocator, max_tokens: int, make_room=None, make_budget=None,
                 quota_tokens: int | None = None):
        self.pool, self.allocator, self.max_tokens = pool, allocator, max_tokens
        self.quota_tokens = max_tokens if quota_tokens is None else min(quota_tokens, max_tokens)
        self.make_room = make_room              # callable(n) -> frees up to n tree tokens
        self.make_budget = make_budget          # callable(owner, n) -> frees store tokens
        self.tokens = 0
        self.usage: Counter[str] = Counter()    # owner -> tokens held
        self.ledger: dict[str, dict[int, PoolKV]] = {}   # owner -> id(block) -> block
        self._building: Counter[str] = Counter()         # owner -> open building scopes
        self._fresh: dict[str, set[int]] = {}            # blocks made in an open scope
        k0 = pool.k_buffer[0]
        self.device, self.dtype = k0.device, k0.dtype
        self.bytes_per_token = 2 * len(pool.k_buffer) * k0.shape[1] * k0.shape[2] * k0.element_size()

    def make(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
             owner: str = "") -> PoolKV:
        """The core's block factory: copy k, v (L, N, H, D) into fresh slots owned by ``owner``."""
        check_kv(k, v, positions)
        n = int(k.shape[1])
        slots = self.alloc(n, owner)
        block = PoolKV(self, slots, positions, owner)
        self.ledger.setdefault(owner, {})[id(block)] = block
        if self._building[owner]:
            self._fresh.setdefault(owner, set()).add(id(block))
        try:
            for layer, (kb, vb) in enumerate(zip(self.pool.k_buffer, self.pool.v_buffer)):
                kb[slots] = k[layer].to(device=self.device, dtype=self.dtype)
                vb[slots] = v[layer].to(device=self.device, dtype=self.dtype)
        except BaseException:
            self.free(block)
            raise
        return block

    def alloc(self, n: int, owner: str = "") -> torch.Tensor:
        """``n`` slots counted to ``owner`` (the caller must wrap them in a ledger block)."""
        if n > self.quota_tokens:
            raise StoreFull(f"{n} tokens are more than a namespace's quota of "
                            f"{self.quota_tokens}")
        if self._over(owner, n) and self.make_budget is not None:
            self.make_budget(owner, n)
        if self.usage[owner] + n > self.quota_tokens:
            raise StoreFull(f"namespace quota: {self.usage[owner]} + {n} > {self.quota_tokens} "
                            "tokens")
        if self.tokens + n > self.max_tokens:
            raise StoreFull(f"store budget: {self.tokens} + {n} > {self.max_tokens} tokens")
        slots = self.allocator.alloc(n) if n else torch.empty(0, dtype=torch.int64, device=self.device)
        if slots is None and self.make_room is not None:
            self.make_room(n)
            slots = self.allocator.alloc(n)
        if slots is None:
            raise StoreFull(f"KV pool has no {n} free slots for the store")
        self.tokens += n
        self.usage[owner] += n
        return slots.to(torch.int64)

    def _over(self, owner: str, n: int) -> bool:
        return self.usage[owner] + n > self.quota_tokens or self.tokens + n > self.max_tokens

    def free(self, block: PoolKV) -> None:
        if block.freed:
            return
        block.freed = True
        self.ledger.get(block.owner, {}).pop(id(block), None)
        self._fresh.get(block.owner, set()).discard(id(block))
        if block.length:
            self.allocator.free(block.slots)
        self.tokens -= block.length
        self.usage[block.owner] -= block.length
        if not self.usage[block.owner]:
            del self.usage[block.owner]

    @contextlib.contextmanager
    def building(self, owner: str):
        """Blocks ``owner`` makes inside this scope survive sweeps until the outermost scope
        ends (a half-built template or anchor is not yet reachable from the owner's state)."""
        self._building[owner] += 1
        try:
            yield
        finally:
            self._building[owner] -= 1
            if not self._building[owner]:
                del self._building[owner]
                self._fresh.pop(owner, None)

    def sweep(self, owner: str, reachable: set[int]) -> int:
        """Free ``owner``'s blocks whose ids are not in ``reachable`` (nor made in an open
        building scope); -> tokens freed."""
        keep = reachable | self._fresh.get(owner, set())
        dead = [b for i, b in self.ledger.get(owner, {}).items() if i not in keep]
        for block in dead:
            self.free(block)
        if not self.ledger.get(owner, True):
            del self.ledger[owner]
        return sum(b.length for b in dead)

    def blocks(self, owner: str | None = None) -> list[PoolKV]:
        owners = self.ledger if owner is None else [owner]
        return [b for o in owners for b in self.ledger.get(o, {}).values()]

    def gather(self, buffers, slots: torch.Tensor) -> torch.Tensor:
        return torch.stack([b[slots] for b in buffers])
