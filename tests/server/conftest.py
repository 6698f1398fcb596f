"""Real SGLang servers on CPU for end-to-end tests (reference/sglang-on-cpu.md §6, §10).

Each server is launched exactly as ``kvcomm-sglang serve --device cpu`` would launch it (through
``launch.build_command``), with the default test model, on a free 127.0.0.1 port, with
``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1`` and ``SGLANG_SHIM_LOG`` set. Stopping a server
checks what a healthy run must leave behind: no ``CALL`` line in the shim log (a kernel stub was
called) and no leak report of SGLang's idle memory check in the server log.

Fixtures (session scope, one server each, shared by every test that asks):
* ``vanilla_server``: no plugin loaded, SGLang's default tree cache;
* ``kvcomm_server``: the kvcomm plugin loaded, ``--radix-cache-backend kvcomm``;
* ``server_factory(backend, extra_args=())``: any other server, e.g.
  ``server_factory("kvcomm", ["--max-total-tokens", "600"])``; one per distinct argument list.

A server that cannot start fails the asking test with its log tail; a failed stop check fails the
session at teardown. ``start_server`` is the underlying helper for tests that manage a server
themselves (call ``server.stop()``, which raises on a failed check).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import pytest

from kvcomm_sglang.runtime_patch import launch

VANILLA = "vanilla"  # backend name meaning: no plugin, SGLang's default tree cache
HEALTH_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 60
SERVER_ENV = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1", "KVCOMM_DEBUG_INVARIANTS": "1"}
LEAK_MARKERS = ("memory leak detected", "mem leak detected", "kv double free",
                "kv page use-after-free",  # invariant_checker.py messages, lower-cased
                "kvcomm invariant")  # kvcomm_sglang.runtime_patch.invariants


@dataclasses.dataclass
class Server:
    """A running server: ``url`` (``http://127.0.0.1:PORT``), its combined stdout/stderr log,
    the launcher's ``pid`` (also its process group), and the shim's call log."""

    url: str
    log_path: pathlib.Path
    shim_log_path: pathlib.Path
    backend: str
    process: subprocess.Popen
    startup_s: float = 0.0

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """Stop the server and check its logs; raises ``AssertionError`` on any problem."""
        problems = self.stop_and_check()
        assert not problems, "\n".join(problems)

    def stop_and_check(self) -> list[str]:
        """Stop the server; return what its run did wrong (empty if nothing)."""
        died_early = self.process.poll() is not None
        _stop(self.process)
        problems = [f"{self} exited on its own (rc={self.process.returncode}) before it was "
                    f"stopped:\n{self.log_tail()}"] if died_early else []
        calls = [line for line in _read_lines(self.shim_log_path) if " CALL " in line]
        if calls:
            problems.append(f"{self}: SGLang called sgl_kernel shim stubs (a GPU kernel on the "
                            f"CPU path): {calls[:10]}")
        leaks = [line for line in _read_lines(self.log_path)
                 if any(marker in line.lower() for marker in LEAK_MARKERS)]
        if leaks:
            problems.append(f"{self}: SGLang's memory check reported leaks: {leaks[:10]}\n"
                            f"{self.log_tail()}")
        return problems

    def log_tail(self, num_lines: int = LOG_TAIL_LINES) -> str:
        lines = _read_lines(self.log_path)[-num_lines:]
        return f"--- last {len(lines)} lines of {self.log_path} ---\n" + "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.backend} server pid {self.pid} at {self.url}"


def start_server(tmp_path_factory: pytest.TempPathFactory, backend: str,
                 extra_args: Sequence[str] = ()) -> Server:
    """Launch a CPU server with the default model and wait until ``/health`` answers 200.

    ``backend``: ``"vanilla"`` (no plugin, default tree cache) or a radix-cache backend name that
    the kvcomm plugin serves (``"kvcomm"``). ``extra_args`` are more SGLang server arguments;
    they win over the recipe's defaults (e.g. ``--max-total-tokens 600``).
    """
    folder = tmp_path_factory.mktemp(f"server-{backend}")
    log_path, shim_log_path = folder / "server.log", folder / "shim.log"
    port = _free_port()
    argv = ["--device", "cpu", "--host", "127.0.0.1", "--port", str(port), *extra_args]
    plugin = backend != VANILLA
    if plugin:
        argv = ["--radix-cache-backend", backend, *argv]
    env = {**os.environ, **SERVER_ENV, "SGLANG_SHIM_LOG": str(shim_log_path)}
    cmd, env = launch.build_command(argv, env, plugin=plugin)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", log_path, shim_log_path, backend, process)
    try:
        _wait_healthy(server)
    except BaseException:
        _stop(process)
        raise
    server.startup_s = time.monotonic() - started
    return server


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory):
    """``server_factory(backend, extra_args=())`` -> a running ``Server``, started once per
    distinct ``(backend, extra_args)`` and stopped (and checked) at the end of the session."""
    servers: dict[tuple[str, tuple[str, ...]], Server] = {}

    def get(backend: str, extra_args: Sequence[str] = ()) -> Server:
        key = (backend, tuple(extra_args))
        if key not in servers:
            servers[key] = start_server(tmp_path_factory, backend, extra_args)
        return servers[key]

    yield get
    problems = [problem for server in servers.values() for problem in server.stop_and_check()]
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def vanilla_server(server_factory) -> Server:
    return server_factory(VANILLA)


@pytest.fixture(scope="session")
def kvcomm_server(server_factory) -> Server:
    return server_factory(launch.BACKEND_NAME)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"{server} died during start-up (rc={server.process.returncode})\n"
                        f"{server.log_tail()}", pytrace=False)
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{server} not healthy after {HEALTH_TIMEOUT_S:.0f} s\n{server.log_tail()}",
                pytrace=False)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the launcher, SIGKILL to its process group after ``STOP_TIMEOUT_S``.

    Only the launcher gets SIGTERM: it drains and stops its children itself. SIGTERM sent to the
    whole group kills the scheduler first, which the 0.5.17 launcher treats as a crash (SIGQUIT,
    5 s of crash diagnostics, then it SIGKILLs itself). Leftovers of the group are killed last.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the group id is the launcher's pid (new session)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _read_lines(path: pathlib.Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
