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


# ---- prefill CUDA-graph buckets on CUDA ----

# benchmarks/gpu/ttft_servers.sh's GRAPH_FIX list: SGLang's default buckets on an H100/H200
# (chunked prefill 8192) plus 1 and 2
H200_BUCKETS = ([1, 2] + list(range(4, 33, 4)) + list(range(48, 257, 16)) +
                list(range(288, 513, 32)) + list(range(576, 1025, 64)) +
                list(range(1280, 4097, 256)) + list(range(4608, 8193, 512)))
H200_MIB = 143771


def fake_gpus(tmp_path, *memory_mib) -> dict:
    """A server env whose PATH holds only an ``nvidia-smi`` reporting these GPUs' memory; each
    call is logged beside it (``nvidia-smi.calls``)."""
    tool = tmp_path / "nvidia-smi"
    tool.write_text('#!/bin/sh\necho "$@" >> "$0.calls"\n'
                    f"printf '%s\\n' {' '.join(map(str, memory_mib))}\n")
    tool.chmod(0o755)
    return {"PATH": str(tmp_path)}


def buckets_of(args: list[str]) -> list[int] | None:
    if launch.PREFILL_GRAPH_FLAG not in args:
        return None
    assert args.count(launch.PREFILL_GRAPH_FLAG) == 1, args
    tail = args[args.index(launch.PREFILL_GRAPH_FLAG) + 1:]
    return [int(v) for v in tail[:next((i for i, v in enumerate(tail) if v.startswith("-")),
                                        len(tail))]]


@pytest.mark.parametrize("device_args", [[], ["--device", "cuda"], ["--device=cuda"]])
def test_cuda_adds_one_and_two_token_buckets_to_the_defaults(tmp_path, device_args):
    user_args = ["--model-path", MODEL, *device_args, "--port", "30000"]
    args = args_of(build(user_args, fake_gpus(tmp_path, H200_MIB, H200_MIB))[0])
    assert args[:len(user_args)] == user_args
    assert buckets_of(args) == H200_BUCKETS
    assert (tmp_path / "nvidia-smi.calls").read_text().split() == [
        "--query-gpu=memory.total", "--format=csv,noheader,nounits"]


def test_no_prefill_buckets_on_cpu(tmp_path):
    env = fake_gpus(tmp_path, H200_MIB)
    args = args_of(build(["--model-path", MODEL, "--device", "cpu"], env)[0])
    assert buckets_of(args) is None
    assert not (tmp_path / "nvidia-smi.calls").exists()


@pytest.mark.parametrize("user_graph_args", [
    ["--cuda-graph-bs-prefill", "4", "8"], ["--cuda-graph-bs-prefill=16"],
    ["--piecewise-cuda-graph-tokens", "4"], ["--cuda-graph-config", '{"prefill": {}}'],
    ["--disable-cuda-graph"], ["--disable-prefill-cuda-graph"],
    ["--disable-piecewise-cuda-graph"], ["--config", "server.yaml"]])
def test_user_prefill_graph_settings_are_left_alone(tmp_path, user_graph_args):
    user_args = ["--model-path", MODEL, *user_graph_args]
    args = args_of(build(user_args, fake_gpus(tmp_path, H200_MIB), plugin=False)[0])
    assert args == user_args
    assert not (tmp_path / "nvidia-smi.calls").exists()


def expected_buckets(max_bucket: int) -> list[int]:
    return sorted({1, 2, *launch.default_prefill_buckets(max_bucket)})


@pytest.mark.parametrize("memory_mib, max_bucket", [
    ((), 4096), ((16384,), 2048), ((24576,), 2048), ((40960,), 4096), ((81559,), 8192),
    ((H200_MIB,), 8192), ((183359,), 16384), ((183359, 81559), 8192)])
def test_default_buckets_follow_the_smallest_gpu(tmp_path, memory_mib, max_bucket):
    """SGLang's default chunked prefill size per GPU memory (no number read: 4096)."""
    args = args_of(build(["--model-path", MODEL], fake_gpus(tmp_path, *memory_mib))[0])
    assert buckets_of(args) == expected_buckets(max_bucket)
    assert max(buckets_of(args)) == max_bucket


def test_no_gpu_tool_means_sglangs_unknown_memory_default():
    assert buckets_of(args_of(build(["--model-path", MODEL], {"PATH": ""})[0])) == \
        expected_buckets(4096)


@pytest.mark.parametrize("size_args, max_bucket", [
    (["--chunked-prefill-size", "2048"], 2048),
    (["--chunked-prefill-size=1000"], 960),
    (["--cuda-graph-max-bs-prefill", "512"], 512),
    (["--piecewise-cuda-graph-max-tokens", "24"], 24),
    (["--cuda-graph-max-bs-prefill", "512", "--chunked-prefill-size", "2048"], 512),
    (["--chunked-prefill-size", "-1"], 2),
    (["--max-total-tokens", "3Ki"], 3072),
    (["--max-total-tokens", "2.5k"], 2304),
    (["--max-total-tokens", "20000"], 8192),
    (["--enable-dp-attention", "--dp-size", "4"], 2048),
    (["--chunked-prefill-size", "8192", "--model-path", "meta-llama/Llama-2-13b-hf"], 4096)])
def test_buckets_follow_the_users_sizes(tmp_path, size_args, max_bucket):
    args = args_of(build(["--model-path", MODEL, *size_args], fake_gpus(tmp_path, H200_MIB))[0])
    assert buckets_of(args) == expected_buckets(max_bucket)
    assert max(buckets_of(args)) == max_bucket


def test_chunked_prefill_size_given_means_no_gpu_query(tmp_path):
    build(["--model-path", MODEL, "--chunked-prefill-size", "4096"], fake_gpus(tmp_path, 1))
    assert not (tmp_path / "nvidia-smi.calls").exists()


def test_buckets_are_sglangs_own_flag_and_default_list(tmp_path):
    """Contract with SGLang 0.5.17: its parser reads the added flag as the bucket list, and
    ``default_prefill_buckets`` is its own generator."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = args_of(build(["--model-path", MODEL], fake_gpus(tmp_path, H200_MIB))[0])
    assert parser.parse_args(args).cuda_graph_bs_prefill == H200_BUCKETS
    for max_tokens in (-1, 1, 4, 100, 1000, 2048, 4096, 8192, 9000, 16384):
        assert launch.default_prefill_buckets(max_tokens) == \
            ServerArgs._generate_prefill_cuda_graph_batch_sizes(None, max_tokens), max_tokens


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


def test_kvcomm_auto_flag_becomes_the_plugins_env():
    cmd, env = launch.build_command(["--device", "cpu", "--kvcomm-auto"], {})
    assert "--kvcomm-auto" not in cmd and env[launch.AUTO_ENV] == "1"
    assert launch.AUTO_ENV not in launch.build_command(["--device", "cpu"], {})[1]


@pytest.mark.parametrize("flag", [["--kvcomm-anchor-path", "anchors"],
                                  ["--kvcomm-anchor-path=anchors"]])
def test_kvcomm_anchor_path_becomes_an_absolute_env_path(flag):
    cmd, env = launch.build_command(["--device", "cpu", *flag, "--port", "7"], {})
    assert not any(arg.startswith("--kvcomm-anchor-path") or arg == "anchors" for arg in cmd)
    assert env[launch.ANCHOR_PATH_ENV] == str(pathlib.Path("anchors").resolve())
    assert args_of(cmd)[args_of(cmd).index("--port") + 1] == "7"
    assert launch.ANCHOR_PATH_ENV not in launch.build_command(["--device", "cpu"], {})[1]
