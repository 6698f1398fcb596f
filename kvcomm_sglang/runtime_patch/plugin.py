"""Entry point of group ``sglang.srt.plugins``: registers the ``kvcomm`` radix-cache backend
and validates KVCOMM hints at the HTTP edge (HTTP 400 with the reason).

SGLang 0.5.17 runs ``register()`` in the launcher (where the tokenizer manager validates
requests) and in every scheduler process (where the radix cache is built).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

SUPPORTED_SGLANG = "0.5.17"
logger = logging.getLogger(__name__)
_registered = False


def register() -> None:
    global _registered
    import sglang

    if sglang.__version__ != SUPPORTED_SGLANG:
        raise RuntimeError(f"kvcomm-sglang supports sglang=={SUPPORTED_SGLANG} only; this is "
                           f"sglang {sglang.__version__}. Install sglang=={SUPPORTED_SGLANG} or "
                           "remove kvcomm from SGLANG_PLUGINS.")
    if _registered:
        return
    from sglang.srt.mem_cache.registry import register_radix_cache_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from kvcomm_sglang.runtime_patch.factory import kvcomm_cache_factory

    try:
        register_radix_cache_backend("kvcomm", kvcomm_cache_factory)
    except ValueError as exc:          # registered twice in one process: harmless
        if "already registered" not in str(exc):
            raise
    HookRegistry.register(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
        validate_request_hook, HookType.BEFORE)
    _registered = True


class MessageRegistry:
    """Message ids and agent templates each namespace has declared (launcher side), so that a
    request naming an unknown id gets HTTP 400 instead of a silent fallback."""

    def __init__(self, max_entries: int = 200_000):
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple, None] = OrderedDict()
        self.lock = threading.Lock()

    def declare(self, *entry) -> None:
        with self.lock:
            self.entries[entry] = None
            self.entries.move_to_end(entry)
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)

    def known(self, *entry) -> bool:
        with self.lock:
            return entry in self.entries


_messages = MessageRegistry()


def validate_request_hook(manager, obj, input_ids, *args, **kwargs):
    """BEFORE hook of TokenizerManager._validate_one_request: ValueError -> HTTP 400."""
    from kvcomm_sglang import protocol

    params = getattr(obj, "sampling_params", None)
    custom = params.get("custom_params") if isinstance(params, dict) else None
    hints = protocol.decode(custom)
    if hints is None:
        return None
    if input_ids is None:
        raise ValueError("KVCOMM hints need the prompt as input_ids or text")
    extra_key = getattr(obj, "extra_key", None)
    protocol.validate(hints, len(input_ids), extra_key)
    for message in hints.consumes:
        if not _messages.known(extra_key, "message", message):
            raise ValueError(f"unknown message id {message!r} in namespace {extra_key!r}: "
                             "capture it (base or capture action) before using it")
    if hints.layout and not hints.template and not _messages.known(extra_key, "agent", hints.agent):
        raise ValueError(f"agent {hints.agent!r} has no registered template in namespace "
                         f"{extra_key!r}: send its template request first")
    for message in hints.produces:
        _messages.declare(extra_key, "message", message)
    if hints.template:
        _messages.declare(extra_key, "agent", hints.agent)
    return None


def kvcomm_config_from_env():
    """-> (KVCommConfig, the field names KVCOMM_CONFIG set explicitly)."""
    import json

    from kvcomm_sglang.config import KVCommConfig

    text = os.environ.get("KVCOMM_CONFIG")
    config = KVCommConfig.from_json(text)
    return config, set(json.loads(text)) if text else set()
