"""Kernel tests run the Triton kernels compiled on CUDA, else under the Triton interpreter on CPU.

Triton reads TRITON_INTERPRET when a ``@triton.jit`` function is decorated (module import) and
again when a launch lazily imports parts of Triton. Without CUDA the variable is therefore set
while our kernel modules are imported (re-imported if something imported them compiled earlier)
and during each test of this folder, and restored otherwise, so other tests and the servers they
spawn never inherit it.
"""

import importlib
import os
import sys

import pytest
import torch
import triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_MODULES = ("kvcomm_sglang.kernels.triton_materialize", "kvcomm_sglang.kernels.distances",
                  "kvcomm_sglang.kernels.validate")


def _interpreted_standard_library() -> None:
    """Triton decides at decoration time whether a @triton.jit function is interpreted. When
    something (e.g. sglang) imported triton first without TRITON_INTERPRET, its standard
    library (tl.sum, tl.max, ...) is compiled-mode and cannot be called from interpreted
    kernels: re-decorate it under the interpreter and rebind the names in triton.language."""
    import triton.language as tl
    import triton.language.standard as standard

    if isinstance(tl.sum, triton.runtime.JITFunction):
        importlib.reload(standard)
        for name in dir(standard):
            if not name.startswith("_") and hasattr(tl, name):
                setattr(tl, name, getattr(standard, name))


def _import_interpreted() -> None:
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _interpreted_standard_library()
        for name in KERNEL_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
            else:
                importlib.import_module(name)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


if DEVICE == "cpu":
    _import_interpreted()


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
