"""ServerProcess: start ``kvcomm-sglang serve`` (or the vanilla recipe) in the background, wait
for /health, stop it by process group (SIGTERM, then SIGKILL) — also on Ctrl-C."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

from kvcomm_sglang.runtime_patch.launch import build_command


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args=(), plugin: bool = True, env: dict | None = None,
                 log_path: str | os.PathLike | None = None, startup_timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.cmd, self.env = build_command(argv, {**os.environ, **(env or {})}, plugin=plugin)
        self.log_path = pathlib.Path(log_path or tempfile.mkstemp(prefix="kvcomm-server-",
                                                                  suffix=".log")[1])
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)   # so `with` blocks clean up
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; log "
                                   f"{self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the server was not healthy after {self.startup_timeout:.0f} s; log "
                           f"{self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the launcher only (a group-wide SIGTERM makes SGLang 0.5.17 treat its
        scheduler's exit as a crash), SIGKILL to the whole group after ``timeout``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)     # sweep whatever is left
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
