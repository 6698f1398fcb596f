"""The Triton interpreter stays inside this folder's tests (see conftest.py).

A fresh interpreter imports our kernels compiled (as the servers and the GPU tests do), then
runs some kernel tests through ``pytest.main`` with a probe plugin. After every test, and after
the session: TRITON_INTERPRET and Triton's ``knobs.runtime.interpret`` are as they were before
it; after the session, the kernels, ``tl.sum`` and ``tl.tensor.sum`` are compiled-mode
``JITFunction`` objects again and no kernel keeps a recorder's ``run``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBED_TESTS = ("tests/kernels/test_specialization.py::test_recording_keeps_each_kernel_as_triton_"
                "decorated_it", "tests/kernels/test_validate.py")

PROBE = r"""
import json, os, sys
import pytest, triton
import triton.language as tl
from kvcomm_sglang.kernels import distances, triton_materialize, validate

def interpreter_state():
    return [os.environ.get("TRITON_INTERPRET"), triton.knobs.runtime.interpret,
            "interpret" in vars(triton.knobs.runtime)]

def kernel_kinds():
    kernels = {"materialize": triton_materialize._materialize_kernel, "tl.sum": tl.sum,
               "validate": validate._validate_kernel, "distances": distances._distances_kernel}
    kinds = {name: type(k).__name__ + (" with run" if "run" in vars(k) else "")
             for name, k in kernels.items()}
    kinds["tl.tensor.sum"] = type(vars(tl.tensor)["sum"]).__name__
    return kinds

class Probe:
    after_tests = {}
    def pytest_runtest_logfinish(self, nodeid):
        self.after_tests[nodeid] = interpreter_state()

before = interpreter_state()
code = pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[Probe()])
print("PROBE " + json.dumps({"code": int(code), "before": before, "after_tests": Probe.after_tests,
                            "after_session": interpreter_state(), "kernels": kernel_kinds()}))
"""


def run_probe(*tests: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PROBE, *tests], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, done.stdout + done.stderr
    return json.loads(lines[-1][len("PROBE "):])


def test_interpreter_state_never_outlives_a_kernel_test():
    report = run_probe(*PROBED_TESTS)
    assert report["code"] == 0, report
    assert report["before"] == [None, False, False]
    assert len(report["after_tests"]) > 1, report
    for nodeid, state in report["after_tests"].items():
        assert state == report["before"], (nodeid, state)
    assert report["after_session"] == report["before"]
    assert set(report["kernels"].values()) == {"JITFunction"}, report["kernels"]
