"""The scheduler hook (SGLang 0.5.17): once per scheduler loop iteration, after the incoming
requests (aborts included) were processed, ``KVCommRadixCache.after_batch`` learns which
requests the scheduler still holds. Decisions of any other request end there, and in debug
mode the invariants are checked (``invariants.py``)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
TARGET = "sglang.srt.managers.scheduler.Scheduler.process_input_requests"


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, after_input_requests, HookType.AFTER)


def after_input_requests(result, scheduler, *args, **kwargs):
    from kvcomm_sglang.runtime_patch.radix_cache import KVCommRadixCache

    cache = getattr(scheduler, "tree_cache", None)
    if isinstance(cache, KVCommRadixCache):
        try:
            cache.after_batch(live_requests(scheduler))
        except Exception:                       # never take the scheduler down
            logger.exception("kvcomm: the after-batch step failed")
    return result


def live_requests(scheduler) -> list:
    """Every request the scheduler holds: queued, chunked, running, or awaiting its results."""
    reqs = list(getattr(scheduler, "waiting_queue", ()))
    batches = [getattr(scheduler, name, None)
               for name in ("running_batch", "last_batch", "cur_batch_for_debug")]
    batches += [batch for batch, _ in getattr(scheduler, "result_queue", ())]
    for batch in batches:
        reqs.extend(getattr(batch, "reqs", None) or ())
    chunked = getattr(scheduler, "chunked_req", None)
    if chunked is not None:
        reqs.append(chunked)
    unique = {id(req): req for req in reqs}
    return list(unique.values())
