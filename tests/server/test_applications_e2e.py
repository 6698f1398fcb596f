"""Applications on real CPU servers (SmolLM2-135M, one port): after one workflow warmed an
application, new workflows of it started at once reuse from their first question; the server
saves the application (``--kvcomm-anchor-path``) when it falls idle; after a restart with the
saved anchors the first new workflow reuses, and a file saved for another model is refused with
the reason in the log while the server serves. The invariant checker runs in both servers."""

import json
import secrets
import shutil
import time
from urllib.parse import urlparse

from benchmarks.applications import at_once, run_workflow, summary, wait_saved
from tests.harness.workflow import QUESTIONS
from tests.server import conftest as server_conftest
from tests.server.conftest import start_server
from tests.server.workflow_client import Workflow

NEW_TOKENS = 16
WARM = 4                        # questions of the first workflow
AT_ONCE = 4                     # new workflows started together on the warm application
FIRST_AFTER_RESTART = WARM + AT_ONCE


def other_models_copy(folder, meta: dict) -> str:
    """A copy of the saved application as if saved by another model; -> its meta file name."""
    name = "0" * 64
    shutil.copy(folder / f"{meta['application']}.pt", folder / f"{name}.pt")
    fingerprint = {**meta["fingerprint"], "model": "f" * 64}
    (folder / f"{name}.json").write_text(json.dumps({**meta, "fingerprint": fingerprint,
                                                     "application": name}))
    return f"{name}.json"


def test_new_workflows_reuse_from_their_first_question_and_after_a_restart(tmp_path_factory,
                                                                           monkeypatch):
    folder = tmp_path_factory.mktemp("anchors")
    args = ["--kvcomm-anchor-path", str(folder)]
    app = secrets.token_urlsafe(16)
    server = start_server(tmp_path_factory, "kvcomm", args)
    try:
        warm = Workflow(server.url, "warm", NEW_TOKENS, application=app)
        for i in range(WARM):
            warm.run(f"w{i}", QUESTIONS[i])
        started = time.time()
        fresh = {f"q{i}": QUESTIONS[i] for i in range(WARM, WARM + AT_ONCE)}
        shared = summary(at_once(server.url, fresh, app, NEW_TOKENS, dense=False))
        meta = wait_saved(folder, started)
    finally:
        server.stop()
    assert shared["first_calls_reused"] >= AT_ONCE // 2, shared
    assert shared["reuse_rate"] >= 0.5, shared
    assert meta["anchors"] >= 2 and len(meta["templates"]) == 3 and app not in json.dumps(meta)
    refused = other_models_copy(folder, meta)
    port = urlparse(server.url).port            # start_server takes a free port: the old one
    monkeypatch.setattr(server_conftest, "_free_port", lambda: port)
    server = start_server(tmp_path_factory, "kvcomm", args)
    try:
        q = FIRST_AFTER_RESTART
        run = run_workflow(server.url, f"r{q}", QUESTIONS[q], app, NEW_TOKENS, dense=False)
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert f"saved application {refused} refused: it was saved under another model" in log
    assert "restored application" in log
    assert run["calls"][0]["mode"] == "reuse", run
    assert summary([run])["reused_calls"] >= 2, run
