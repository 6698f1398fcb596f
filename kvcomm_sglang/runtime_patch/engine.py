"""In-process use: ``engine(...)`` builds ``sglang.Engine`` with the kvcomm backend, and
``generate(engine, ...)`` sends one request with its workflow namespace (SGLang 0.5.17's
``Engine.generate`` has no ``extra_key`` argument)."""

from __future__ import annotations

import os
import sys

from kvcomm_sglang.runtime_patch.launch import (BACKEND_NAME, CPU_ENV, CPU_ENV_DEFAULTS, SHIM_DIR,
                                                _default_model_dir, _plugins_whitelist,
                                                _prepend_path)


def engine(model_path: str | None = None, device: str | None = None, **kwargs):
    """An in-process ``sglang.Engine`` with the kvcomm backend (``radix_cache_backend="kvcomm"``,
    ``page_size=1``). ``device="cpu"`` applies the CPU recipe to this process first (environment,
    the ``sgl_kernel`` import shim on ``sys.path``/``PYTHONPATH`` for the spawned schedulers);
    call it before anything imports sglang."""
    env = dict(os.environ)
    env["SGLANG_PLUGINS"] = _plugins_whitelist(env.get("SGLANG_PLUGINS", ""), True)
    if device == "cpu":
        env.update(CPU_ENV)
        for name, value in CPU_ENV_DEFAULTS.items():
            env.setdefault(name, value)
        env["PYTHONPATH"] = _prepend_path(str(SHIM_DIR), env.get("PYTHONPATH", ""))
        if str(SHIM_DIR) not in sys.path:
            sys.path.insert(0, str(SHIM_DIR))
        kwargs.setdefault("attention_backend", "torch_native")
        kwargs.setdefault("max_total_tokens", 20000)
    os.environ.update(env)
    import sglang

    kwargs.setdefault("radix_cache_backend", BACKEND_NAME)
    kwargs.setdefault("page_size", 1)
    if device is not None:
        kwargs["device"] = device
    return sglang.Engine(model_path=str(model_path or _default_model_dir()), **kwargs)


def generate(eng, input_ids, sampling_params: dict, extra_key: str | None = None) -> dict:
    """One (non-streaming) request through ``eng`` with ``extra_key`` (the KVCOMM namespace)."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    obj = GenerateReqInput(input_ids=list(input_ids), sampling_params=dict(sampling_params),
                           extra_key=extra_key)
    return eng.loop.run_until_complete(eng.tokenizer_manager.generate_request(obj, None).__anext__())
