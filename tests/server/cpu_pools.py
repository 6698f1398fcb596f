"""KVCommRadixCache on SGLang 0.5.17's own CPU pools, without a server, and requests that walk
the scheduler's steps through it (match, load-back, compute, finish or retract)."""

from __future__ import annotations

import secrets
import types

import torch
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey

from kvcomm_sglang import protocol
from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.rope import RopeSpec
from kvcomm_sglang.runtime_patch.radix_cache import KVCommRadixCache
from kvcomm_sglang.runtime_patch.runtime import KVCommRuntime

LAYERS, HEADS, DIM = 2, 2, 8


def make_cache(size: int = 256, metrics=None, **config) -> KVCommRadixCache:
    pool = MHATokenToKVPool(size=size, page_size=1, dtype=torch.float32, head_num=HEADS,
                            head_dim=DIM, layer_num=LAYERS, device="cpu",
                            enable_memory_saver=False, enable_alt_stream=False)
    allocator = TokenToKVPoolAllocator(size=size, dtype=torch.float32, device="cpu", kvcache=pool,
                                       need_sort=False)
    params = CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(8, 256, "cpu", False),
                             token_to_kv_pool_allocator=allocator, page_size=1)
    cfg = KVCommConfig(**{"debug_invariants": True, **config})
    return KVCommRadixCache(params, lambda c: KVCommRuntime(
        cfg, RopeSpec.build(DIM, 10000.0), pool, allocator, size,
        c.req_to_token_pool.req_to_token, make_room=c.make_room, metrics=metrics))


def namespace() -> str:
    return "kvcomm:" + secrets.token_urlsafe(16)


class FINISH_LENGTH:                 # noqa: N801 (SGLang's finish-reason class names)
    pass


class FINISH_ABORT:                  # noqa: N801
    pass


class Req(types.SimpleNamespace):
    """The fields of SGLang's Req that the cache and the runtime read."""

    count = 0

    def __init__(self, ids, extra_key=None, hints=None, output_ids=()):
        Req.count += 1
        super().__init__(rid=f"r{Req.count}", origin_input_ids=list(ids), extra_key=extra_key,
                         sampling_params=types.SimpleNamespace(
                             custom_params=protocol.encode(**hints) if hints else None),
                         output_ids=list(output_ids), finished_reason=None, return_logprob=False,
                         req_pool_idx=None, prefix_indices=torch.empty(0, dtype=torch.int64),
                         last_node=None, cache_protected_len=0)

    def finished(self) -> bool:
        return self.finished_reason is not None

    def get_fill_ids(self):
        return self.origin_input_ids + self.output_ids


def admit(cache, req) -> int:
    """The scheduler's admission: match (KVCOMM reuse reports a host hit), load back, lock,
    then a row of slots for the whole sequence. -> prefix tokens served from the cache."""
    key = RadixKey(req.origin_input_ids[:-1], req.extra_key)
    match = cache.match_prefix(MatchPrefixParams(key=key, req=req))
    prefix, node = match.device_indices, match.last_device_node
    if match.host_hit_length:
        req.prefix_indices = prefix                 # as the scheduler: load-back reads it
        loaded, node = cache.init_load_back(InitLoadBackParams(
            best_match_node=match.best_match_node, host_hit_length=match.host_hit_length,
            req=req))
        prefix = torch.cat([prefix, loaded])
    req.prefix_indices, req.last_node, req.cache_protected_len = prefix, node, len(prefix)
    cache.inc_lock_ref(node)
    idx = cache.req_to_token_pool.alloc([req])
    req.req_pool_idx = idx[0] if isinstance(idx, list) else int(idx)
    total = len(req.origin_input_ids) + len(req.output_ids)
    fresh = cache.token_to_kv_pool_allocator.alloc(total - len(prefix))
    for buf in cache.runtime.pool.k_buffer + cache.runtime.pool.v_buffer:
        buf[fresh] = torch.randn(len(fresh), HEADS, DIM)
    row = torch.cat([prefix, fresh]).to(torch.int32)
    cache.req_to_token_pool.req_to_token[req.req_pool_idx, :total] = row
    return len(prefix)


def release(cache, req, finished=FINISH_LENGTH, is_insert: bool = True) -> None:
    """SGLang's release_kv_cache: a finish (or, with ``finished=None``, a retraction)."""
    req.finished_reason = finished() if finished else None
    total = len(req.origin_input_ids) + len(req.output_ids)
    insert = is_insert and not getattr(req, "skip_radix_cache_insert", False)
    cache.cache_finished_req(req, insert, kv_len_to_handle=total)
    cache.req_to_token_pool.free(req)
    req.req_pool_idx = None


def serve(cache, ids, extra_key=None, hints=None, output_ids=(7, 8, 9)) -> Req:
    req = Req(ids, extra_key, hints, output_ids)
    admit(cache, req)
    release(cache, req)
    return req


def pool_is_whole(cache) -> bool:
    allocator = cache.token_to_kv_pool_allocator
    return (allocator.available_size() + cache.evictable_size() + cache.protected_size()
            == allocator.size)
