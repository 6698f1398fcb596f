"""``kvcomm-sglang serve``: the command and environment ``build_command`` makes, the sgl_kernel
shim, and one real vanilla server answering greedy requests from its radix cache."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import entry_points

import pytest

from kvcomm_sglang import models
from kvcomm_sglang.runtime_patch import launch
from tests.server.conftest import Server

MODEL = "/models/m"
CPU_FLAGS = ("--attention-backend", "--sleep-on-idle", "--max-total-tokens",
             "--enable-cache-report")


def build(argv, env=None, **kwargs):
    return launch.build_command(argv, {} if env is None else env, **kwargs)


def args_of(cmd: list[str]) -> list[str]:
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"], cmd
    return cmd[3:]


def value_of(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} should appear once in {args}"
    return args[args.index(flag) + 1]


# ---- the CPU recipe ----

def test_cpu_recipe_applied_with_device_cpu():
    cmd, env = build(["--model-path", MODEL, "--device", "cpu"])
    args = args_of(cmd)
    assert value_of(args, "--attention-backend") == "torch_native"
    assert value_of(args, "--max-total-tokens") == "20000"
    assert "--sleep-on-idle" in args and "--enable-cache-report" in args
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(launch.SHIM_DIR)
    assert (launch.SHIM_DIR / "sgl_kernel" / "__init__.py").is_file()


def test_cpu_recipe_accepts_equals_form():
    cmd, env = build(["--model-path", MODEL, "--device=cpu"])
    assert value_of(args_of(cmd), "--attention-backend") == "torch_native"
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"


@pytest.mark.parametrize("device_args", [[], ["--device", "cuda"]])
def test_no_cpu_recipe_without_device_cpu(device_args):
    user_env = {"PYTHONPATH": "/site/extra"}
    cmd, env = build(["--model-path", MODEL, *device_args], user_env)
    args = args_of(cmd)
    assert not [flag for flag in CPU_FLAGS if flag in args]
    assert "SGLANG_USE_CPU_ENGINE" not in env and "OMP_NUM_THREADS" not in env
    assert env["PYTHONPATH"] == "/site/extra", "the shim goes on PYTHONPATH only in cpu mode"


def test_cpu_recipe_respects_user_flags_and_env():
    user_args = ["--model", MODEL, "--device", "cpu", "--attention-backend", "triton",
                 "--max-total-tokens=600", "--page-size", "16", "--radix-cache-backend", "other"]
    user_env = {"OMP_NUM_THREADS": "2", "PYTHONPATH": "/site/extra"}
    cmd, env = build(user_args, user_env)
    args = args_of(cmd)
    assert args[:len(user_args)] == user_args, "user arguments come first, unchanged"
    added = args[len(user_args):]
    assert added == ["--sleep-on-idle", "--enable-cache-report"], added
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["PYTHONPATH"] == os.pathsep.join([str(launch.SHIM_DIR), "/site/extra"])
    assert user_env == {"OMP_NUM_THREADS": "2", "PYTHONPATH": "/site/extra"}, "env not mutated"


def test_shim_not_duplicated_on_pythonpath():
    _, env = build(["--model-path", MODEL, "--device", "cpu"], {"PYTHONPATH": str(launch.SHIM_DIR)})
    assert env["PYTHONPATH"] == str(launch.SHIM_DIR)


# ---- plugin, backend, model ----

def test_plugin_backend_and_page_size_added():
    args = args_of(build(["--model-path", MODEL])[0])
    assert value_of(args, "--radix-cache-backend") == "kvcomm"
    assert value_of(args, "--page-size") == "1"


def test_vanilla_command_forces_nothing():
    cmd, env = build(["--model-path", MODEL], plugin=False)
    args = args_of(cmd)
    assert "--radix-cache-backend" not in args and "--page-size" not in args
    assert env["SGLANG_PLUGINS"] == launch.NO_PLUGINS


@pytest.mark.parametrize("user, plugin, expected", [
    (None, True, "kvcomm"),
    ("", True, "kvcomm"),
    ("foo", True, "foo,kvcomm"),
    ("foo, kvcomm ,bar", True, "foo,bar,kvcomm"),
    ("foo,kvcomm", False, "foo"),
    (None, False, launch.NO_PLUGINS),
    ("kvcomm", False, launch.NO_PLUGINS),
])
def test_sglang_plugins_merging(user, plugin, expected):
    env = {} if user is None else {"SGLANG_PLUGINS": user}
    assert build(["--model-path", MODEL], env, plugin=plugin)[1]["SGLANG_PLUGINS"] == expected


def test_default_model_when_model_path_missing():
    args = args_of(build(["--device", "cpu"])[0])
    assert value_of(args, "--model-path") == str(models.default_model_dir())


@pytest.mark.parametrize("model_args", [["--model-path", MODEL], ["--model-path=" + MODEL],
                                        ["--model", MODEL], [MODEL]])
def test_user_model_path_kept(model_args):
    args = args_of(build(model_args)[0])
    assert MODEL in " ".join(args) and str(models.default_model_dir()) not in args
    assert args[0].startswith("--"), "a positional model path becomes --model-path"


def test_help_needs_no_model():
    assert "--model-path" not in args_of(build(["--help"])[0])


def test_main_execs_the_command(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execvpe", lambda file, args, env: calls.append((file, args, env)))
    launch.main(["serve", "--model-path", MODEL, "--device", "cpu"])
    (file, args, env), = calls
    assert file == sys.executable and args == build(["--model-path", MODEL, "--device", "cpu"],
                                                    os.environ)[0]
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"


def test_main_requires_serve():
    with pytest.raises(SystemExit, match="usage: kvcomm-sglang serve"):
        launch.main(["--model-path", MODEL])


def test_console_script_and_entry_point_installed():
    assert (pathlib.Path(sys.executable).parent / "kvcomm-sglang").is_file(), \
        "run `pip install --no-deps -e .` to install the kvcomm-sglang console script"
    plugins = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert plugins.get("kvcomm") == "kvcomm_sglang.runtime_patch.plugin:register", plugins


# ---- the sgl_kernel shim ----

def test_shim_stubs_import_and_raise_when_called(tmp_path):
    log = tmp_path / "shim.log"
    code = ("import sgl_kernel, torch\n"
            "from sgl_kernel import rmsnorm\n"
            "assert sgl_kernel.__file__.startswith(%r)\n"
            "assert not hasattr(torch.ops.sgl_kernel, 'convert_weight_packed')\n"
            "try:\n    rmsnorm(1)\nexcept NotImplementedError as e:\n    print(e)\n"
            % str(launch.SHIM_DIR))
    env = {**os.environ, "PYTHONPATH": str(launch.SHIM_DIR), "SGLANG_SHIM_LOG": str(log)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "sgl_kernel shim: rmsnorm" in out.stdout
    events = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    assert events == ["IMPORT rmsnorm", "CALL rmsnorm"], events


# ---- the fixtures' stop check ----

def fake_server(tmp_path, argv=("sleep", "60")) -> Server:
    process = subprocess.Popen(list(argv), start_new_session=True)
    return Server("http://127.0.0.1:9", tmp_path / "server.log", tmp_path / "shim.log",
                  "vanilla", process)


def test_stop_check_passes_a_clean_run(tmp_path):
    server = fake_server(tmp_path)
    (tmp_path / "shim.log").write_text("12 IMPORT rmsnorm\n")
    (tmp_path / "server.log").write_text("The server is fired up and ready to roll!\n")
    assert server.stop_and_check() == []
    assert server.process.returncode == -15


def test_stop_check_reports_shim_calls_leaks_and_early_death(tmp_path):
    server = fake_server(tmp_path, ("true",))
    server.process.wait()
    (tmp_path / "shim.log").write_text("12 IMPORT rmsnorm\n12 CALL rmsnorm\n")
    (tmp_path / "server.log").write_text("ValueError: token_to_kv_pool_allocator memory leak "
                                         "detected! available_size=5\n")
    problems = "\n".join(server.stop_and_check())
    assert "exited on its own" in problems
    assert "12 CALL rmsnorm" in problems
    assert "memory leak detected" in problems
    with pytest.raises(AssertionError, match="CALL rmsnorm"):
        server.stop()


# ---- a real server ----

def generate(url: str, text: str, max_new_tokens: int = 8) -> tuple[dict, float]:
    body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens}}
    request = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response), time.perf_counter() - started


def test_vanilla_server_greedy_and_radix_hits(vanilla_server):
    prompt = "The capital of France is"
    first, first_s = generate(vanilla_server.url, prompt)
    second, second_s = generate(vanilla_server.url, prompt)
    print(f"\n{vanilla_server}: launch to /health {vanilla_server.startup_s:.1f} s; "
          f"/generate 8 tokens {first_s:.2f} s, repeated {second_s:.2f} s")
    # Greedy text pinned for sglang 0.5.17 / torch 2.11 / the 5.12.1 conversion (§6.3, §10).
    assert first["text"] == " Paris.\n\nThe answer is:", first["text"]
    assert second["text"] == first["text"], "greedy decoding must repeat itself"
    assert first["meta_info"]["completion_tokens"] == 8
    meta = second["meta_info"]
    assert meta["cached_tokens"] > 0, meta
    assert meta["cached_tokens"] == meta["prompt_tokens"] - 1, "all but the last prompt token"
