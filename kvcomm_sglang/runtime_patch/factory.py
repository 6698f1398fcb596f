"""kvcomm_cache_factory(ctx): build KVCommRadixCache, or refuse a configuration KVCOMM cannot
serve exactly, naming the flag (SGLang 0.5.17 ``TreeCacheBuildContext``)."""

from __future__ import annotations

import logging

from kvcomm_sglang.rope import RopeSpec

logger = logging.getLogger(__name__)
SUPPORTED_ROTARY = ("RotaryEmbedding", "LinearScalingRotaryEmbedding", "Llama3RotaryEmbedding",
                    "YaRNScalingRotaryEmbedding")
KV_DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32")


def check_supported(ctx) -> None:
    args = ctx.server_args
    problems = []
    if ctx.params.page_size != 1:
        problems.append(f"--page-size {ctx.params.page_size}: KVCOMM needs --page-size 1")
    if str(getattr(args, "kv_cache_dtype", "auto")) not in KV_DTYPES:
        problems.append(f"--kv-cache-dtype {args.kv_cache_dtype}: quantized KV cannot be "
                        "re-rotated exactly")
    if getattr(args, "speculative_algorithm", None):
        problems.append("--speculative-algorithm: speculative decoding is not supported")
    if ctx.disable_radix_cache:
        problems.append("--disable-radix-cache: KVCOMM serves reuse through the radix cache")
    if ctx.enable_hierarchical_cache:
        problems.append("--enable-hierarchical-cache: HiCache is not supported with KVCOMM")
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.is_dsa:
        problems.append("--model-path: hybrid SWA/SSM and DSA models are not supported")
    if getattr(ctx.model_config, "attention_arch", None) is not None and \
            "MLA" in str(ctx.model_config.attention_arch):
        problems.append("--model-path: MLA models are not supported")
    if ctx.tp_size > 1 or getattr(args, "pp_size", 1) > 1:
        problems.append(f"--tp-size {ctx.tp_size} / --pp-size {getattr(args, 'pp_size', 1)}: "
                        "KVCOMM runs on one rank for now")
    if problems:
        raise ValueError("the kvcomm radix-cache backend cannot serve this configuration: "
                         + "; ".join(problems))


def rope_of(ctx) -> RopeSpec:
    """The model's RoPE, refused unless a delta rotation reproduces it exactly."""
    model = ctx.tp_worker.model_runner.model
    rotary = next((m for m in model.modules() if hasattr(m, "cos_sin_cache")
                   and hasattr(m, "rotary_dim")), None)
    if rotary is None:
        raise ValueError("--model-path: no rotary embedding found; KVCOMM needs a RoPE model")
    kind = type(rotary).__name__
    if kind not in SUPPORTED_ROTARY:
        raise ValueError(f"--model-path: rotary embedding {kind} cannot be re-rotated exactly "
                         f"(supported: {', '.join(SUPPORTED_ROTARY)})")
    spec = RopeSpec.from_hf_config(ctx.model_config.hf_config)
    if spec.rotary_dim != rotary.rotary_dim or spec.head_dim != rotary.head_size:
        raise ValueError(f"--model-path: RoPE dims from the config ({spec.rotary_dim}/"
                         f"{spec.head_dim}) differ from the model's ({rotary.rotary_dim}/"
                         f"{rotary.head_size})")
    return RopeSpec(spec.head_dim, spec.rotary_dim, spec.inv_freq, bool(rotary.is_neox_style),
                    spec.kind, spec.mscale)


def kvcomm_cache_factory(ctx):
    from kvcomm_sglang.runtime_patch.plugin import kvcomm_config_from_env
    from kvcomm_sglang.runtime_patch.radix_cache import KVCommRadixCache
    from kvcomm_sglang.runtime_patch.report import Metrics
    from kvcomm_sglang.runtime_patch.runtime import KVCommRuntime

    check_supported(ctx)
    config, explicit = kvcomm_config_from_env()
    rope = rope_of(ctx)
    runner = ctx.tp_worker.model_runner
    pool = runner.token_to_kv_pool
    if type(pool).__name__ != "MHATokenToKVPool":
        raise ValueError(f"KV pool {type(pool).__name__} is not supported (--kv-cache-dtype, "
                         "--model-path): KVCOMM needs SGLang's MHATokenToKVPool")
    metrics = Metrics({"tp_rank": str(ctx.tp_rank)}) if ctx.params.enable_metrics else None
    persistence = anchor_persistence(ctx, config, rope, pool)

    def runtime_factory(cache):
        return KVCommRuntime(config, rope, pool, cache.token_to_kv_pool_allocator,
                             int(cache.token_to_kv_pool_allocator.size),
                             cache.req_to_token_pool.req_to_token, make_room=cache.make_room,
                             metrics=metrics, persistence=persistence,
                             derive_anchor_budget="anchor_budget_bytes" not in explicit)

    cache = KVCommRadixCache(ctx.params, runtime_factory)
    logger.info("kvcomm: radix-cache backend ready (%s, store up to %d tokens)", config,
                cache.runtime.store.max_tokens)
    return cache


def anchor_persistence(ctx, config, rope, pool):
    """``--kvcomm-anchor-path`` (env ``KVCOMM_ANCHOR_PATH``): applications saved and loaded
    there, under this server's fingerprint; None without it."""
    import os

    from kvcomm_sglang.runtime_patch.persistence import PATH_ENV, AnchorPersistence, fingerprint

    path = os.environ.get(PATH_ENV)
    if not path:
        return None
    runner = ctx.tp_worker.model_runner
    print_ = fingerprint(runner.model, ctx.model_config.hf_config,
                         getattr(ctx.server_args, "tokenizer_path", None), pool, rope, config)
    return AnchorPersistence(path, print_, config)
