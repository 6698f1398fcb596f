"""In-process ``sgl.Engine(..., radix_cache_backend="kvcomm")`` on CPU, in a fresh interpreter."""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json
    import secrets
    from kvcomm_sglang import protocol
    from kvcomm_sglang.runtime_patch.engine import engine, generate

    namespace = "kvcomm:" + secrets.token_urlsafe(16)      # a workflow's secret namespace
    eng = engine(device="cpu", log_level="error")
    try:
        plain = eng.generate(input_ids=[1, 504, 3458, 314, 4849], sampling_params={
            "temperature": 0, "max_new_tokens": 4})
        hinted = generate(eng, [1, 504, 3458, 314, 4849, 28], {
            "temperature": 0, "max_new_tokens": 4,
            "custom_params": protocol.encode(base=("m", "user_question", 2))}, namespace)
        print("RESULT " + json.dumps({"plain": plain["output_ids"],
                                      "report": hinted["meta_info"].get("kvcomm")}))
    finally:
        eng.shutdown()
""")


def test_engine_in_process_with_the_kvcomm_backend():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"engine run failed (rc={out.returncode}):\\n{out.stderr[-3000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert len(result["plain"]) == 4
    assert result["report"][0]["mode"] == "dense"          # a base request: nothing to reuse
