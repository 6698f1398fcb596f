"""``kvcomm-sglang serve <sglang server args>``: SGLang's server with the KVCOMM plugin enabled.

What it adds to the user's arguments (each only where the user did not say otherwise):

* ``--kvcomm-anchor-path DIR`` (removed from SGLang's arguments): ``KVCOMM_ANCHOR_PATH`` = DIR
  made absolute; applications' templates and anchors are saved there and loaded at the next
  start (``runtime_patch/persistence.py``);
* ``--kvcomm-auto`` (removed from SGLang's arguments): ``KVCOMM_AUTO=1``, the auto mode that
  finds shared spans of plain requests (``runtime_patch/auto.py``);
* always: ``SGLANG_PLUGINS`` whitelists ``kvcomm`` (plugins the user listed stay listed; an unset
  variable becomes just ``kvcomm``), ``--radix-cache-backend kvcomm``, ``--page-size 1``, and
  ``--model-path`` = the converted test model (``kvcomm_sglang.models.default_model_dir()``);
* with ``--device cpu``, the CPU recipe of reference/sglang-on-cpu.md §6.1/§10:
  ``SGLANG_USE_CPU_ENGINE=1``, ``OMP_NUM_THREADS=1``, the ``sgl_kernel`` import shim first on
  ``PYTHONPATH``, ``--attention-backend torch_native --sleep-on-idle --max-total-tokens 20000
  --enable-cache-report``;
* on CUDA (no ``--device``, or ``--device cuda``): ``--cuda-graph-bs-prefill`` with prefill
  CUDA-graph buckets 1 and 2 beside SGLang's default buckets (``prefill_graph_buckets``). A
  reused or cached prefix leaves a one-token tail to compute; SGLang 0.5.17's default buckets
  start at 4 tokens and it replays a graph only when padding at most doubles the tokens, so
  that prefill ran eagerly (radix hit 24 -> 16 ms for a 3.7 K-token prompt on an H100).
  Skipped when the user configures prefill graphs (``USER_GRAPH_FLAGS``).

Then it execs ``python -m sglang.launch_server`` (the entry point that the CPU recipe was checked
with), so signals (Ctrl-C, SIGTERM) reach SGLang's launcher directly. ``build_command`` is the
part without side effects (but one ``nvidia-smi`` query on CUDA, for the default buckets),
shared with the server test fixtures.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

PLUGIN_NAME = "kvcomm"  # entry point name in group "sglang.srt.plugins" (pyproject.toml)
BACKEND_NAME = "kvcomm"  # what plugin.register() registers with register_radix_cache_backend
NO_PLUGINS = "none"  # SGLANG_PLUGINS is a whitelist; a name no plugin has loads none of them
SHIM_DIR = pathlib.Path(__file__).resolve().parent / "sgl_kernel_shim"
SERVER_MODULE = "sglang.launch_server"

MODEL_FLAGS = ("--model-path", "--model")  # SGLang 0.5.17 accepts both spellings
PLUGIN_DEFAULTS = (("--radix-cache-backend", BACKEND_NAME), ("--page-size", "1"))
ANCHOR_PATH_FLAG, ANCHOR_PATH_ENV = "--kvcomm-anchor-path", "KVCOMM_ANCHOR_PATH"  # persistence.py
AUTO_FLAG, AUTO_ENV = "--kvcomm-auto", "KVCOMM_AUTO"      # runtime_patch/auto.py
CPU_DEFAULTS = (
    ("--attention-backend", "torch_native"),  # the x86 CPU default, intel_amx, needs sgl_kernel
    ("--sleep-on-idle", None),  # idle scheduler sleeps instead of spinning one core
    ("--max-total-tokens", "20000"),  # 0.42 GB pool instead of one sized from free RAM
    ("--enable-cache-report", None),  # OpenAI usage.prompt_tokens_details.cached_tokens
)
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}
CPU_ENV_DEFAULTS = {"OMP_NUM_THREADS": "1"}  # 8-20x faster decode on small CPUs

PREFILL_GRAPH_FLAG = "--cuda-graph-bs-prefill"  # SGLang 0.5.17: a list of ints, replaces defaults
TAIL_BUCKETS = (1, 2)
# After any of these the prefill graphs are the user's: the flag and its deprecated alias, the
# JSON graph config (it outranks flags), the switches that turn prefill graphs off, and a YAML
# config file (it ranks below the command line, so an added flag would override its values).
USER_GRAPH_FLAGS = (PREFILL_GRAPH_FLAG, "--piecewise-cuda-graph-tokens", "--cuda-graph-config",
                    "--disable-cuda-graph", "--disable-prefill-cuda-graph",
                    "--disable-piecewise-cuda-graph", "--config")
MAX_PREFILL_GRAPH_FLAGS = ("--cuda-graph-max-bs-prefill", "--piecewise-cuda-graph-max-tokens")
_SCALES = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}  # SGLang's human_readable_int


def build_command(argv: Sequence[str], env: Mapping[str, str], *,
                  plugin: bool = True) -> tuple[list[str], dict[str, str]]:
    """The SGLang server command and environment for ``kvcomm-sglang serve argv``.

    ``argv`` are SGLang server arguments (a leading positional is taken as the model path, as in
    ``sglang serve``); ``env`` is not modified. ``plugin=False`` gives the vanilla server of the
    same recipe: the kvcomm plugin is kept out of ``SGLANG_PLUGINS`` and no backend is forced.
    """
    args = _normalize_positional_model(list(argv))
    new_env = dict(env)
    args, anchor_path = _pop_flag(args, ANCHOR_PATH_FLAG)
    if anchor_path is not None:         # ours, not SGLang's: the scheduler's runtime reads it
        new_env[ANCHOR_PATH_ENV] = str(pathlib.Path(anchor_path).resolve())
    if AUTO_FLAG in args:               # ours, not SGLang's: the launcher's plugin reads the env
        args = [arg for arg in args if arg != AUTO_FLAG]
        new_env[AUTO_ENV] = "1"
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
    if _wants_prefill_graph_buckets(args):
        args += [PREFILL_GRAPH_FLAG, *map(str, prefill_graph_buckets(args, new_env))]
    return [sys.executable, "-m", SERVER_MODULE, *args], new_env


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``kvcomm-sglang``; replaces this process with the SGLang server."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        sys.exit("usage: kvcomm-sglang serve [--model-path DIR] [--device cpu] [--kvcomm-auto] "
                 "[--kvcomm-anchor-path DIR] [other `python -m sglang.launch_server` arguments]")
    cmd, env = build_command(argv[1:], os.environ)
    os.execvpe(cmd[0], cmd, env)


def prefill_graph_buckets(args: Sequence[str], env: Mapping[str, str]) -> list[int]:
    """``TAIL_BUCKETS`` and SGLang 0.5.17's default prefill buckets for these server arguments
    (``default_prefill_buckets`` up to ``prefill_graph_max_tokens``), ascending."""
    return sorted({*TAIL_BUCKETS, *default_prefill_buckets(prefill_graph_max_tokens(args, env))})


def default_prefill_buckets(max_tokens: int) -> list[int]:
    """SGLang 0.5.17's ``ServerArgs._generate_prefill_cuda_graph_batch_sizes(max_tokens)``."""
    sizes = [*range(4, 33, 4), *range(48, 257, 16), *range(288, 513, 32), *range(576, 1025, 64),
             *range(1280, 4097, 256), *range(4608, max_tokens + 1, 512)]
    return [size for size in sizes if size <= max_tokens]


def prefill_graph_max_tokens(args: Sequence[str], env: Mapping[str, str]) -> int:
    """The largest default prefill bucket, as SGLang 0.5.17 resolves it for a non-MLA model
    (``ServerArgs._handle_gpu_memory_settings``, then the DP-attention clamp): the user's
    ``--cuda-graph-max-bs-prefill``, else the chunked prefill size (the user's, else the one
    SGLang picks from the smallest GPU's memory), at most ``--max-total-tokens``, at most 4096
    for a ``llama-2`` model path, divided by ``--dp-size`` with ``--enable-dp-attention``.
    (MLA models, 2048 in SGLang, are not told apart: their list goes up to the chunked size.)"""
    explicit = _int_flag(args, *MAX_PREFILL_GRAPH_FLAGS)
    if explicit is not None:
        return explicit
    chunked = _int_flag(args, "--chunked-prefill-size")
    if chunked is None:
        chunked = default_chunked_prefill_size(gpu_memory_mib(env))
    max_tokens = chunked
    total = _int_flag(args, "--max-total-tokens")
    if total is not None:
        max_tokens = min(max_tokens, total)
    model = _flag_value(args, "--model-path") or _flag_value(args, "--model") or ""
    if "llama-2" in model.lower():
        max_tokens = min(max_tokens, 4096)
    if "--enable-dp-attention" in args:
        max_tokens = min(max_tokens, chunked // (_int_flag(args, "--dp-size") or 1))
    return max_tokens


def default_chunked_prefill_size(gpu_memory: float | None) -> int:
    """SGLang 0.5.17's default ``--chunked-prefill-size`` for a GPU of ``gpu_memory`` MiB."""
    if gpu_memory is None:
        return 4096
    for below_gib, size in ((35, 2048), (60, 4096), (160, 8192)):
        if gpu_memory < below_gib * 1024:
            return size
    return 16384


def gpu_memory_mib(env: Mapping[str, str]) -> float | None:
    """The smallest GPU's memory in MiB, read as SGLang reads it (``nvidia-smi`` on the server's
    ``PATH``); None when there is no ``nvidia-smi`` or it reports no number."""
    tool = shutil.which("nvidia-smi", path=env.get("PATH", ""))
    if tool is None:
        return None
    try:
        done = subprocess.run([tool, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                              env=dict(env), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    values = [float(v) for v in done.stdout.split() if re.fullmatch(r"\d+(\.\d+)?", v)]
    return min(values) if done.returncode == 0 and values else None


def _wants_prefill_graph_buckets(args: Sequence[str]) -> bool:
    return (_flag_value(args, "--device") in (None, "cuda") and not _is_help(args)
            and not any(_has_flag(args, flag) for flag in USER_GRAPH_FLAGS))


def _int_flag(args: Sequence[str], *flags: str) -> int | None:
    """The value of the first of ``flags`` in ``args`` as SGLang parses it (an int, or for
    ``human_readable_int`` flags a number with an SI or IEC suffix: 20k, 64Ki); None when absent
    or unreadable (SGLang's own parser then reports it)."""
    value = next((v for flag in flags if (v := _flag_value(args, flag)) is not None), None)
    match = re.fullmatch(r"(-?\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", (value or "").strip())
    if match is None:
        return None
    number, suffix = match.groups()
    return int(float(number) * _SCALES.get(suffix, 1))


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


def _pop_flag(args: list[str], flag: str) -> tuple[list[str], str | None]:
    """``args`` without ``flag value`` / ``flag=value``, and its (last) value or None."""
    value, rest, i = None, [], 0
    while i < len(args):
        if args[i] == flag and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if args[i].startswith(flag + "="):
            value = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return rest, value


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
