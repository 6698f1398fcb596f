"""Entry point of group ``sglang.srt.plugins``: registers the ``kvcomm`` radix-cache backend
and checks every request at the HTTP edge (HTTP 400 with the reason, docs/protocol.md).

SGLang 0.5.17 runs ``register()`` in the launcher (where the tokenizer manager validates
requests) and in every scheduler process (where the radix cache is built).
"""

from __future__ import annotations

import logging
import os

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

    from kvcomm_sglang.runtime_patch import scheduler_hook
    from kvcomm_sglang.runtime_patch.factory import kvcomm_cache_factory

    try:
        register_radix_cache_backend("kvcomm", kvcomm_cache_factory)
    except ValueError as exc:          # registered twice in one process: harmless
        if "already registered" not in str(exc):
            raise
    HookRegistry.register(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
        validate_request_hook, HookType.BEFORE)
    scheduler_hook.register()
    from kvcomm_sglang.runtime_patch import auto

    if auto.enabled():
        auto.register()
    _registered = True


def validate_request_hook(manager, obj, input_ids, *args, **kwargs):
    """BEFORE hook of TokenizerManager._validate_one_request, which 0.5.17 calls once per single
    request after tokenization (/generate, /v1/completions and /v1/chat/completions, each
    request of a batch, Engine.generate): a ValueError raised here becomes HTTP 400 with its
    message. Every request: token ids inside the vocabulary, a bounded extra_key, a valid
    namespace behind 'kvcomm:'. Hinted requests: the hints and their consistency."""
    from kvcomm_sglang import protocol

    if input_ids is not None:
        protocol.validate_input_ids(_as_list(input_ids), manager.model_config.vocab_size)
    extra_key = getattr(obj, "extra_key", None)
    protocol.validate_extra_key(extra_key)
    _check_sampling(manager, obj)
    params = getattr(obj, "sampling_params", None)
    hints = protocol.decode(params.get("custom_params") if isinstance(params, dict) else None)
    if hints is None:
        return None
    if input_ids is None:
        raise ValueError("KVCOMM hints need the prompt as input_ids or text")
    protocol.validate(hints, len(input_ids), extra_key)
    return None


def _check_sampling(manager, obj) -> None:
    """SGLang builds and verifies the request's SamplingParams right after this hook and turns
    anything but a ValueError there (``"temperature": "hot"``: a TypeError) into HTTP 500; so
    build and verify them here first, and refuse with 400."""
    params = getattr(obj, "sampling_params", None)
    if params is None:
        return
    if not isinstance(params, dict):
        raise ValueError("sampling_params must be an object")
    try:
        sampling = manager.sampling_params_class(**{**(manager.preferred_sampling_params or {}),
                                                     **params})
        sampling.verify(manager.model_config.vocab_size)
    except ValueError:
        raise
    except Exception as exc:                     # TypeError, AttributeError, ...: bad input
        raise ValueError(f"invalid sampling_params: {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from None


def _as_list(input_ids):
    """The prompt's ids as a list (a multimodal processor may hand over a tensor)."""
    return input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids


def kvcomm_config_from_env():
    """-> (KVCommConfig, the field names KVCOMM_CONFIG set explicitly). ``KVCOMM_DEBUG_INVARIANTS=1``
    turns the invariant checker on whatever KVCOMM_CONFIG says (the test servers set it)."""
    import json

    from kvcomm_sglang.config import KVCommConfig

    text = os.environ.get("KVCOMM_CONFIG")
    config = KVCommConfig.from_json(text)
    if os.environ.get("KVCOMM_DEBUG_INVARIANTS") == "1":
        config = config.replace(debug_invariants=True)
    return config, set(json.loads(text)) if text else set()
