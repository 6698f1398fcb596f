"""Kernel tests run the Triton kernels compiled on CUDA, else under the Triton interpreter on CPU.

How Triton 3.6 reads the interpreter flag: ``triton.knobs.runtime.interpret`` reads
TRITON_INTERPRET from the environment on every access. ``@triton.jit`` reads it once, when a
function is decorated (module import): it returns an ``InterpretedFunction`` when set, a
compiled ``JITFunction`` otherwise, and that object keeps its kind for life. Launches read it
again (constexpr functions called inside interpreted kernels).

So on CPU, for the tests of this folder only: our kernel modules and Triton's standard library
(``tl.sum``, ``tl.max``, ...) are re-imported interpreted when the folder's first test starts
and put back as they were after its last test; TRITON_INTERPRET is set during each test and
restored after it. Other folders' tests, and the servers they spawn, never see either. On CUDA
nothing is changed.
"""

import contextlib
import importlib
import os
import sys

import pytest
import torch
import triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_MODULES = ("kvcomm_sglang.kernels.validate", "kvcomm_sglang.kernels.triton_materialize",
                  "kvcomm_sglang.kernels.distances")


@contextlib.contextmanager
def interpreter_env(value: str | None):
    """TRITON_INTERPRET set to ``value`` (None: unset) inside the block, as it was after it."""
    saved = os.environ.get("TRITON_INTERPRET")
    _set_env(value)
    try:
        yield
    finally:
        _set_env(saved)


def _set_env(value: str | None) -> None:
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value


def _standard_library_bindings() -> dict:
    """Every binding a (re-)import of ``triton.language.standard`` makes: its own namespace,
    the names it re-exports in ``triton.language`` and the members it adds to ``tl.tensor``."""
    import triton.language as tl
    import triton.language.standard as standard

    names = [name for name in vars(standard) if not name.startswith("__")]
    return {"standard": dict(vars(standard)),
            "tl": {name: getattr(tl, name) for name in names if hasattr(tl, name)},
            "tensor": {name: vars(tl.tensor)[name] for name in names if name in vars(tl.tensor)}}


def _restore_standard_library(bindings: dict) -> None:
    import triton.language as tl
    import triton.language.standard as standard

    vars(standard).update(bindings["standard"])
    for name, value in bindings["tl"].items():
        setattr(tl, name, value)
    for name, value in bindings["tensor"].items():
        setattr(tl.tensor, name, value)


def _interpreted_standard_library() -> None:
    """Interpreted kernels cannot call a compiled ``tl.sum``: when triton was first imported
    without TRITON_INTERPRET (the usual case), re-decorate its standard library under the
    interpreter and rebind the names in ``triton.language`` (call with the variable set)."""
    import triton.language as tl
    import triton.language.standard as standard

    if isinstance(tl.sum, triton.runtime.JITFunction):
        importlib.reload(standard)
        for name in dir(standard):
            if not name.startswith("_") and hasattr(tl, name):
                setattr(tl, name, getattr(standard, name))


def import_kernels() -> None:
    """(Re-)import our kernel modules, so that ``@triton.jit`` reads TRITON_INTERPRET now."""
    for name in KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])
        else:
            importlib.import_module(name)


@pytest.fixture(autouse=True, scope="package")
def _interpreted_kernels():
    """CPU: the kernels and Triton's standard library interpreted for this folder's tests only."""
    if DEVICE == "cuda":
        yield
        return
    bindings, initial = _standard_library_bindings(), os.environ.get("TRITON_INTERPRET")
    with interpreter_env("1"):
        _interpreted_standard_library()
        import_kernels()
    try:
        yield
    finally:
        _restore_standard_library(bindings)
        with interpreter_env(initial):
            import_kernels()


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
