"""The README's section "Using it from SGLang's frontend" runs as written against the CPU server
(only its URL, http://127.0.0.1:30000, becomes the test server's)."""

import contextlib
import io
import pathlib
import re

import sglang as sgl

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Using it from SGLang's frontend"
README_URL = "http://127.0.0.1:30000"


def section_code_blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION) + len(SECTION)
    end = re.compile(r"^##+ ", re.M).search(text, start)
    return re.findall(r"```python\n(.*?)```", text[start:end.start() if end else None], re.S)


def run_block(code: str, url: str) -> tuple[dict, str]:
    assert README_URL in code, "each block must name the server it talks to"
    scope, out = {"__name__": "readme"}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace(README_URL, url), str(README), "exec"), scope)
    return scope, out.getvalue()


def test_the_readme_frontend_section_runs_as_written(kvcomm_server):
    blocks = section_code_blocks()
    assert len(blocks) == 2, f"expected the workflow and the AgentGraph blocks, got {len(blocks)}"
    previous = sgl.global_config.default_backend
    try:
        scope, printed = run_block(blocks[0], kvcomm_server.url)
    finally:
        sgl.global_config.default_backend = previous
    wf = scope["wf"]
    assert len(wf.calls) == 2 * len(scope["questions"]) and wf.namespace.startswith("kvcomm:")
    assert [line.split()[0] for line in printed.splitlines()] == ["0", "1"] * 3, printed
    assert all(c.mode in ("reuse", "dense") and c.text for c in wf.calls)

    scope, printed = run_block(blocks[1], kvcomm_server.url)
    result = scope["result"]
    assert result.final_answer and len(result.calls) == 4
    assert printed.splitlines()[-4].startswith("solver 1 "), printed
