"""How many compiled variants our kernels need, from Triton's own argument binder for an sm_90
target (no GPU needed): a signature compiles once, never once per plan or message shape.

Triton compiles a new variant when an integer argument becomes 1 or a multiple of 16, or a
pointer's 16-byte alignment changes, unless told not to specialize it. Plans differ in all of
those from request to request (sizes, anchor counts, the validator's epoch, index columns split
from one buffer), and each compile stalls the serving loop for ~0.5-0.7 s (three such stalls in
one H200 TTFT run). The binder tests record the kernels' launches instead of running them (on
either device); on a GPU one more test launches the same plans and counts Triton's compiled
variants.
Run as a script (``python -m tests.kernels.test_specialization``), it also compiles every
recorded variant to sm_90 machine code on the CPU, which catches what the interpreter lets
through (a loop-carried value changing shape, for one).
"""

import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, create_function_from_signature

from kvcomm_sglang.kernels import MaterializePlan, distances, triton_materialize, validate
from tests.kernels import test_distances, test_materialize
from tests.kernels.conftest import DEVICE, import_kernels, interpreter_env

PLANS = [(7, 3, 0), (1, 1, 0), (16, 16, 1), (33, 0, 3), (32, 2, 0), (48, 20, 1), (5, 1, 2)]
MESSAGES = [(7, 3), (1, 1), (16, 16), (33, 2), (5, 20)]
TARGET = GPUTarget("cuda", 90, 32)        # H100 / H200
KERNELS = ((triton_materialize, "_materialize_kernel"), (validate, "_validate_kernel"),
           (distances, "_distances_kernel"))


class Recorder:
    """Stands in for a kernel's launches: binds each launch's arguments as Triton would for an
    H100/H200 and keeps one launch per distinct (specialization, options) key, i.e. per variant
    Triton would compile. ``kernel[grid](...)`` and ``kernel.warmup(...)`` both end in the
    kernel's ``run``, which ``install_recorders`` replaces by ``Recorder.run`` on the kernel
    object itself: the module keeps its kernel, so the launchers' compiled-or-interpreted check
    (by the kernel's type) still sees the truth on either device."""

    def __init__(self, kernel):
        if not isinstance(kernel, triton.runtime.JITFunction):      # interpreted: same options
            kernel = triton.runtime.JITFunction(kernel.fn, **kernel.kwargs)
        self.kernel, self.backend = kernel, make_backend(TARGET)
        self.bind = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        self.variants = {}

    @property
    def keys(self):
        return set(self.variants)

    def run(self, *args, grid, warmup, **kwargs):
        bound, specialization, options = self.bind(*args, **kwargs)
        key = (repr(specialization), repr(sorted(options.items())))
        self.variants.setdefault(key, (kwargs, bound, specialization, options))

    def compile_all(self):
        """Compile every recorded variant for ``TARGET`` as Triton's launcher would."""
        for kwargs, bound, specialization, options in self.variants.values():
            options, signature, constexprs, attrs = self.kernel._pack_args(
                self.backend, kwargs, bound, specialization, options)
            triton.compile(ASTSource(self.kernel, signature, constexprs, attrs), target=TARGET,
                           options=options.__dict__)


def sliced(plan, offset):
    """The same plan with every index column and token weight a view at ``offset`` elements into
    a larger buffer (as ``from_reuse_plan``'s split columns are): other 16-byte alignments."""
    fields = dict(plan.__dict__)
    for name in ("dst_slots", "src_slots", "positions", "group", "token_wk", "token_wv"):
        t = fields[name]
        fields[name] = torch.cat([t.new_zeros((offset,) + t.shape[1:]), t])[offset:]
    return MaterializePlan(**fields)


def plan_cases():
    """(n, a, offset, (plan, pool, cos_sin)) for every plan of ``PLANS``, at its column offset."""
    for seed, (n, a, offset) in enumerate(PLANS):
        plan, pool, cos_sin = test_materialize.make_case(n, a, torch.bfloat16,
                                                         num_slots=400 + seed, seed=seed)
        yield n, a, offset, (sliced(plan, offset), pool, cos_sin)


def launch_plans():
    """Validate and launch materialize for every plan of ``PLANS`` (at other column offsets)."""
    for n, a, offset, (plan, pool, cos_sin) in plan_cases():
        guard = validate.count_violations(plan, pool.k_buffer[0].shape[0], cos_sin.shape[0], 3)
        k_table, v_table, aligned = triton_materialize._pool_info(pool)
        triton_materialize._launch(plan, pool, cos_sin, guard, k_table, v_table, aligned)
        yield n, a, offset


def launch_messages():
    for seed, (n, a) in enumerate(MESSAGES):
        distances.anchor_distances(*test_distances.make_case(n, a, seed=seed))


def install_recorders(set_item=operator.setitem) -> dict:
    """A ``Recorder`` taking each launch of each kernel of ``KERNELS``: its ``run`` set in the
    kernel object's own ``__dict__`` (``set_item``: e.g. monkeypatch's, which deletes it after)."""
    out = {}
    for module, name in KERNELS:
        kernel = getattr(module, name)
        out[name] = Recorder(kernel)
        set_item(vars(kernel), "run", out[name].run)
    return out


@pytest.fixture
def recorders(monkeypatch):
    monkeypatch.setattr(triton_materialize, "_compiled", set())
    return install_recorders(monkeypatch.setitem)


def test_recording_keeps_each_kernel_as_triton_decorated_it(recorders):
    """The launchers tell a compiled kernel from an interpreted one by its type, so a stand-in
    object in a kernel's place, beside a CUDA pool, read as "got cuda:0 with the interpreter
    on" (the H200 failure of the tests below): recording leaves every kernel in place."""
    for module, name in KERNELS:
        kernel = getattr(module, name)
        assert type(kernel) is (JITFunction if DEVICE == "cuda" else InterpretedFunction), name
        assert vars(kernel)["run"] == recorders[name].run, name


def test_materialize_and_validator_compile_once_for_every_plan(recorders):
    """Two materialize variants (the default tiles for <= 1 and > 1 anchors, both compiled at
    the first launch) and one validator, whatever the plan's size, anchor count, epoch and the
    alignment of its index columns."""
    for n, a, offset in launch_plans():
        assert len(recorders["_materialize_kernel"].keys) == 2, (n, a, offset)
        assert len(recorders["_validate_kernel"].keys) == 1, (n, a, offset)


def test_distances_compile_once_for_every_message(recorders):
    """One distances variant for messages of any length and any anchor count."""
    launch_messages()
    assert len(recorders["_distances_kernel"].keys) == 1


def _compiled_variants(kernel) -> int:
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="compiled kernels only (the interpreter compiles nothing)")
def test_one_compile_serves_plans_of_every_size_anchor_count_and_offset():
    """On the card: after the first plan, plans with other token and anchor counts (1 and
    multiples of 16 included), index columns at other alignments and another validation epoch
    launch the kernels compiled then (a compile while serving is a stall of ~0.5 s)."""
    cases = plan_cases()
    _, _, _, first = next(cases)
    test_materialize.run_and_compare(triton_materialize.materialize_triton, *first)
    counts = (_compiled_variants(triton_materialize._materialize_kernel),
              _compiled_variants(validate._validate_kernel))
    for _, _, _, case in cases:
        test_materialize.run_and_compare(triton_materialize.materialize_triton, *case)
    assert (_compiled_variants(triton_materialize._materialize_kernel),
            _compiled_variants(validate._validate_kernel)) == counts


def test_every_variant_compiles_for_sm90():
    """The recorded variants compile to sm_90 code on this CPU machine (in a clean process: the
    kernel tests import the kernels interpreted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "tests.kernels.test_specialization"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled 4 variants for sm_90" in done.stdout, done.stdout


def main():
    """Record every plan's and message's launches, then compile each variant for sm_90."""
    on_cpu = DEVICE == "cpu"
    if on_cpu:                   # the launchers take CPU tensors with interpreted kernels only
        with interpreter_env("1"):
            import_kernels()
    recorders = install_recorders()
    list(launch_plans())
    launch_messages()
    if on_cpu:                   # compiling resolves the kernels' @triton.jit helpers: compiled
        with interpreter_env(None):
            import_kernels()
    for recorder in recorders.values():
        recorder.compile_all()
    total = sum(len(r.variants) for r in recorders.values())
    print(f"compiled {total} variants for sm_90")


if __name__ == "__main__":
    main()
