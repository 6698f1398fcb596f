"""Import-only stand-in for ``sgl_kernel`` on a CPU machine (reference/sglang-on-cpu.md §5).

With ``SGLANG_USE_CPU_ENGINE=1``, SGLang 0.5.17 runs ``from sgl_kernel import <name>_cpu`` at
import time, but the plain (non-speculative) serving path never calls these functions: without
AMX every layer takes its torch fallback. So every attribute is a stub that raises if called.

This module registers no ``torch.ops.sgl_kernel`` operators on purpose: ``cpu_has_amx_support()``
asks for ``torch.ops.sgl_kernel.convert_weight_packed``, and must stay False.

Only the launcher puts this folder's parent (``sgl_kernel_shim``) on ``PYTHONPATH``, and only with
``--device cpu`` (``kvcomm_sglang.runtime_patch.launch``). Set ``SGLANG_SHIM_LOG=<file>`` to
append ``<pid> IMPORT <name>`` when a name is looked up and ``<pid> CALL <name>`` when a stub is
called; the server tests fail on any ``CALL`` line.
"""

import os

LOG_ENV = "SGLANG_SHIM_LOG"


def _log(event: str, name: str) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as log:
            log.write(f"{os.getpid()} {event} {name}\n")


def _make_stub(name: str):
    def stub(*args, **kwargs):
        _log("CALL", name)
        raise NotImplementedError(f"sgl_kernel shim: {name} has no CPU implementation here "
                                  f"(only the import is stood in for)")

    stub.__name__ = stub.__qualname__ = name
    return stub


def __getattr__(name: str):
    if name.startswith("__"):  # keep the import machinery's dunder probes ordinary
        raise AttributeError(name)
    _log("IMPORT", name)
    stub = globals()[name] = _make_stub(name)  # later lookups (and `from` imports) hit the cache
    return stub
