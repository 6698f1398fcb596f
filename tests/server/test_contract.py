"""The SGLang 0.5.17 API that ``runtime_patch/`` subclasses, hooks or reads, pinned.

Every symbol the plugin overrides or calls through has its parameter names and kinds pinned here
(annotations ignored; ``name=`` marks a parameter with a default, ``*`` starts keyword-only
ones), and every record type its fields. A failure names the symbol and says what changed: update
the adapter in ``runtime_patch/`` for the new SGLang, then this table.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import sglang
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.managers.tokenizer_manager import TokenizerManager
from sglang.srt.mem_cache import base_prefix_cache, registry
from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode
from sglang.srt.plugins.hook_registry import HookRegistry, HookType
from sglang.srt.sampling.sampling_params import SamplingParams

PINNED_VERSION = "0.5.17"

RADIX_CACHE_METHODS = {  # name: (class that defines it in 0.5.17, parameters)
    "__init__": (RadixCache, "self, params"),
    "match_prefix": (RadixCache, "self, params"),
    "cache_finished_req": (RadixCache, "self, req, is_insert=, *, kv_len_to_handle"),
    "cache_unfinished_req": (RadixCache, "self, req, chunked="),
    "evict": (RadixCache, "self, params"),
    "inc_lock_ref": (RadixCache, "self, node"),
    "dec_lock_ref": (RadixCache, "self, node, params="),
    "evictable_size": (RadixCache, "self"),
    "protected_size": (RadixCache, "self"),
    "reset": (RadixCache, "self"),
    "init_load_back": (BasePrefixCache, "self, params"),
    "insert": (RadixCache, "self, params"),
    "_insert_helper": (RadixCache, "self, node, key, value, priority=, chunked="),
    "_delete_leaf": (RadixCache, "self, node"),
    "_update_leaf_status": (RadixCache, "self, node"),
}

EXACT_FIELDS = {
    "MatchResult": ("device_indices", "last_device_node", "last_host_node", "best_match_node",
                    "host_hit_length", "swa_host_hit_length", "mamba_host_hit_length",
                    "mamba_branching_seqlen", "cache_protected_len", "full_kv_hit_length",
                    "cache_actions"),
    "InitLoadBackParams": ("best_match_node", "host_hit_length", "mem_quota", "req"),
    "MatchPrefixParams": ("key", "cow_mamba", "req"),
    "EvictParams": ("num_tokens", "swa_num_tokens", "mamba_num"),
    "EvictResult": ("num_tokens_evicted", "swa_num_tokens_evicted", "mamba_num_evicted"),
    "InsertParams": ("key", "value", "mamba_value", "prev_prefix_len", "swa_evicted_seqlen",
                     "chunked", "priority"),
}
TREE_CACHE_BUILD_CONTEXT_FIELDS = (
    "server_args", "params", "is_hybrid_swa", "is_hybrid_ssm", "enable_hierarchical_cache",
    "disable_radix_cache", "effective_chunked_prefill_size", "tp_worker", "model_config",
    "tp_size", "tp_rank", "tp_group", "full_tokens_per_layer", "is_dsa")
CACHE_INIT_PARAMS_USED = ("disable", "req_to_token_pool", "token_to_kv_pool_allocator",
                          "page_size", "is_eagle", "enable_metrics", "enable_kv_cache_events",
                          "eviction_policy", "disable_finished_insert")
TREE_NODE_ATTRIBUTES = ("children", "parent", "key", "value", "lock_ref", "last_access_time")
REQ_ATTRIBUTES = ("rid", "origin_input_ids", "output_ids", "req_pool_idx", "prefix_indices",
                  "last_node", "extra_key", "sampling_params", "customized_info",
                  "cache_protected_len", "finished_reason")


def params_of(fn) -> str:
    """``inspect.signature`` as names and kinds only: 'self, req, is_insert=, *, kv_len_to_handle'
    (``/`` and ``*`` as in a ``def``; ``name=`` marks a default)."""
    parts, previous = [], None
    for param in inspect.signature(fn).parameters.values():
        kind = param.kind
        if previous is param.POSITIONAL_ONLY and kind is not param.POSITIONAL_ONLY:
            parts.append("/")
        if kind is param.KEYWORD_ONLY and previous not in (param.KEYWORD_ONLY,
                                                           param.VAR_POSITIONAL):
            parts.append("*")
        stars = {param.VAR_POSITIONAL: "*", param.VAR_KEYWORD: "**"}.get(kind, "")
        default = "=" if param.default is not param.empty else ""
        parts.append(f"{stars}{param.name}{default}")
        previous = kind
    if previous is inspect.Parameter.POSITIONAL_ONLY:
        parts.append("/")
    return ", ".join(parts)


def fields_of(cls) -> tuple[str, ...]:
    if dataclasses.is_dataclass(cls):
        return tuple(field.name for field in dataclasses.fields(cls))
    if hasattr(cls, "_fields"):  # NamedTuple
        return tuple(cls._fields)
    raise AssertionError(f"{cls.__qualname__} is neither a dataclass nor a NamedTuple any more")


def assigned_in(source: str, names) -> list[str]:
    return [name for name in names if f"self.{name}" not in source]


def test_params_of_renders_every_kind():
    def sample(a, b=1, /, c=2, *args, d, e=3, **kwargs):
        pass

    def keyword_only(a, *, b):
        pass

    assert params_of(sample) == "a, b=, /, c=, *args, d, e=, **kwargs"
    assert params_of(keyword_only) == "a, *, b"


def test_sglang_version_is_pinned():
    assert sglang.__version__ == PINNED_VERSION, (
        f"sglang {sglang.__version__} is installed; the plugin and these pins are for "
        f"{PINNED_VERSION} (DESIGN §5)")


@pytest.mark.parametrize("name", sorted(RADIX_CACHE_METHODS))
def test_radix_cache_method_signature(name):
    owner, expected = RADIX_CACHE_METHODS[name]
    method = getattr(RadixCache, name, None)
    assert method is not None, f"RadixCache.{name} is gone (the plugin overrides or calls it)"
    assert method.__qualname__ == f"{owner.__name__}.{name}", (
        f"RadixCache.{name} is now defined by {method.__qualname__}, was {owner.__name__}.{name}")
    assert params_of(method) == expected, (
        f"RadixCache.{name} parameters changed: was ({expected}), now ({params_of(method)})")


def test_base_prefix_cache_abstract_methods():
    expected = {"cache_finished_req", "cache_unfinished_req", "dec_lock_ref", "evict",
                "inc_lock_ref", "match_prefix", "reset"}
    assert set(BasePrefixCache.__abstractmethods__) == expected, (
        f"BasePrefixCache's abstract methods changed: was {sorted(expected)}, now "
        f"{sorted(BasePrefixCache.__abstractmethods__)} (0.5.23 has checkpoint instead of "
        f"cache_*_req)")


@pytest.mark.parametrize("name", sorted(EXACT_FIELDS))
def test_record_fields(name):
    cls = getattr(base_prefix_cache, name, None)
    assert cls is not None, f"base_prefix_cache.{name} is gone"
    assert fields_of(cls) == EXACT_FIELDS[name], (
        f"{name} fields changed: was {EXACT_FIELDS[name]}, now {fields_of(cls)}")


def test_tree_cache_build_context_fields():
    fields = fields_of(registry.TreeCacheBuildContext)
    assert fields == TREE_CACHE_BUILD_CONTEXT_FIELDS, (
        f"TreeCacheBuildContext fields changed: was {TREE_CACHE_BUILD_CONTEXT_FIELDS}, "
        f"now {fields}")


def test_cache_init_params_fields_we_read():
    missing = set(CACHE_INIT_PARAMS_USED) - set(fields_of(CacheInitParams))
    assert not missing, f"CacheInitParams lost the fields {sorted(missing)} that the plugin reads"


def test_tree_node_attributes():
    assert params_of(TreeNode.__init__) == "self, id=, priority=", (
        f"TreeNode.__init__ parameters changed: now ({params_of(TreeNode.__init__)})")
    missing = assigned_in(inspect.getsource(TreeNode.__init__), TREE_NODE_ATTRIBUTES)
    assert not missing, f"TreeNode.__init__ no longer sets {missing}"


def test_radix_key():
    expected = "self, token_ids, extra_key=, is_bigram=, limit="
    assert params_of(RadixKey.__init__) == expected, (
        f"RadixKey.__init__ parameters changed: was ({expected}), "
        f"now ({params_of(RadixKey.__init__)})")
    key = RadixKey([1, 2, 3], extra_key="ns")
    assert list(key.token_ids) == [1, 2, 3] and key.extra_key == "ns", (
        "RadixKey(token_ids, extra_key) no longer keeps its arguments as .token_ids/.extra_key")


def test_register_radix_cache_backend():
    fn = registry.register_radix_cache_backend
    assert params_of(fn) == "name, factory", (
        f"register_radix_cache_backend parameters changed: now ({params_of(fn)})")
    assert "is already registered" in inspect.getsource(fn), (
        "register_radix_cache_backend no longer says 'is already registered' on a duplicate; "
        "plugin.register() tolerates duplicates by that text")
    assert "factory(ctx)" in inspect.getsource(registry.create_tree_cache), (
        "create_tree_cache no longer calls the registered factory as factory(ctx)")


def test_hook_registry_register():
    register = inspect.getattr_static(HookRegistry, "register")
    assert isinstance(register, classmethod), "HookRegistry.register is no longer a classmethod"
    expected = "target, hook, hook_type=, *, source="
    assert params_of(HookRegistry.register) == expected, (
        f"HookRegistry.register parameters changed: was ({expected}), "
        f"now ({params_of(HookRegistry.register)})")
    assert {hook_type.name for hook_type in HookType} == {"BEFORE", "AFTER", "AROUND", "REPLACE"}


def test_tokenizer_manager_validate_one_request():
    fn = TokenizerManager._validate_one_request
    assert params_of(fn) == "self, obj, input_ids", (
        f"TokenizerManager._validate_one_request parameters changed: now ({params_of(fn)}); "
        f"the plugin's BEFORE hook receives (self, obj, input_ids)")
    assert not inspect.iscoroutinefunction(fn), (
        "TokenizerManager._validate_one_request became a coroutine; the plugin's hook is sync")


def test_req_attributes_we_read():
    missing = assigned_in(inspect.getsource(Req.__init__), REQ_ATTRIBUTES)
    assert not missing, f"Req.__init__ no longer sets {missing} (the plugin reads them)"


def test_sampling_params_custom_params():
    fields = getattr(SamplingParams, "__struct_fields__", None) or fields_of(SamplingParams)
    assert "custom_params" in fields, (
        "SamplingParams lost custom_params, which carries the KVCOMM actions (DESIGN §3)")
