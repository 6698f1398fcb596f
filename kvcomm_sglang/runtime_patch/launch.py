"""``kvcomm-sglang serve <sglang server args>``: SGLang's server with the KVCOMM plugin enabled.

What it adds to the user's arguments (each only where the user did not say otherwise):

* always: ``SGLANG_PLUGINS`` whitelists ``kvcomm`` (plugins the user listed stay listed; an unset
  variable becomes just ``kvcomm``), ``--radix-cache-backend kvcomm``, ``--page-size 1``, and
  ``--model-path`` = the converted test model (``kvcomm_sglang.models.default_model_dir()``);
* with ``--device cpu``, the CPU recipe of reference/sglang-on-cpu.md §6.1/§10:
  ``SGLANG_USE_CPU_ENGINE=1``, ``OMP_NUM_THREADS=1``, the ``sgl_kernel`` import shim first on
  ``PYTHONPATH``, ``--attention-backend torch_native --sleep-on-idle --max-total-tokens 20000
  --enable-cache-report``.

Then it execs ``python -m sglang.launch_server`` (the entry point that the CPU recipe was checked
with), so signals (Ctrl-C, SIGTERM) reach SGLang's launcher directly. ``build_command`` is the
pure part, shared with the server test fixtures.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping, Sequence

PLUGIN_NAME = "kvcomm"  # entry point name in group "sglang.srt.plugins" (pyproject.toml)
BACKEND_NAME = "kvcomm"  # what plugin.register() registers with register_radix_cache_backend
NO_PLUGINS = "none"  # SGLANG_PLUGINS is a whitelist; a name no plugin has loads none of them
SHIM_DIR = pathlib.Path(__file__).resolve().parent / "sgl_kernel_shim"
SERVER_MODULE = "sglang.launch_server"

MODEL_FLAGS = ("--model-path", "--model")  # SGLang 0.5.17 accepts both spellings
PLUGIN_DEFAULTS = (("--radix-cache-backend", BACKEND_NAME), ("--page-size", "1"))
CPU_DEFAULTS = (
    ("--attention-backend", "torch_native"),  # the x86 CPU default, intel_amx, needs sgl_kernel
    ("--sleep-on-idle", None),  # idle scheduler sleeps instead of spinning one core
    ("--max-total-tokens", "20000"),  # 0.42 GB pool instead of one sized from free RAM
    ("--enable-cache-report", None),  # OpenAI usage.prompt_tokens_details.cached_tokens
)
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}
CPU_ENV_DEFAULTS = {"OMP_NUM_THREADS": "1"}  # 8-20x faster decode on small CPUs


def build_command(argv: Sequence[str], env: Mapping[str, str], *,
                  plugin: bool = True) -> tuple[list[str], dict[str, str]]:
    """The SGLang server command and environment for ``kvcomm-sglang serve argv``.

    ``argv`` are SGLang server arguments (a leading positional is taken as the model path, as in
    ``sglang serve``); ``env`` is not modified. ``plugin=False`` gives the vanilla server of the
    same recipe: the kvcomm plugin is kept out of ``SGLANG_PLUGINS`` and no backend is forced.
    """
    args = _normalize_positional_model(list(argv))
    new_env = dict(env)
    new_env["SGLANG_PLUGINS"] = _plugins_whitelist(env.get("SGLANG_PLUGINS", ""), plugin)
    if plugin:
        args = _with_defaults(args, PLUGIN_DEFAULTS)
    if _flag_value(args, "--device") == "cpu":
        args = _with_defaults(args, CPU_DEFAULTS)
        new_env.update(CPU_ENV)
        for name, value in CPU_ENV_DEFAULTS.items():
            new_env.setdefault(name, value)
        new_env["PYTHONPATH"] = _prepend_path(str(SHIM_DIR), env.get("PYTHONPATH", ""))
    if not _is_help(args) and not any(_has_flag(args, flag) for flag in MODEL_FLAGS):
        args = ["--model-path", str(_default_model_dir()), *args]
    return [sys.executable, "-m", SERVER_MODULE, *args], new_env


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``kvcomm-sglang``; replaces this process with the SGLang server."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        sys.exit("usage: kvcomm-sglang serve [--model-path DIR] [--device cpu] "
                 "[other `python -m sglang.launch_server` arguments]")
    cmd, env = build_command(argv[1:], os.environ)
    os.execvpe(cmd[0], cmd, env)


def _plugins_whitelist(current: str, plugin: bool) -> str:
    names = [name.strip() for name in current.split(",") if name.strip()]
    names = [name for name in names if name not in (PLUGIN_NAME, NO_PLUGINS)]
    if plugin:
        names.append(PLUGIN_NAME)
    return ",".join(names) or NO_PLUGINS


def _with_defaults(args: list[str], defaults) -> list[str]:
    """Append each ``(flag, value)`` (``value`` None: a switch) whose flag ``args`` lacks."""
    extra: list[str] = []
    for flag, value in defaults:
        if not _has_flag(args, flag):
            extra += [flag] if value is None else [flag, value]
    return args + extra


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag value`` or ``flag=value`` in ``args``, else None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _normalize_positional_model(args: list[str]) -> list[str]:
    if args and not args[0].startswith("-"):
        return ["--model-path", args[0], *args[1:]]
    return args


def _is_help(args: Sequence[str]) -> bool:
    return "-h" in args or "--help" in args


def _prepend_path(entry: str, path: str) -> str:
    parts = [part for part in path.split(os.pathsep) if part and part != entry]
    return os.pathsep.join([entry, *parts])


def _default_model_dir() -> pathlib.Path:
    from kvcomm_sglang import models  # converts the GGUF on first use (~15 s)

    return models.default_model_dir()


if __name__ == "__main__":
    main()
