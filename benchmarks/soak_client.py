"""The soak's HTTP side: one /generate request with its outcome (streamed, aborted on purpose,
refused, or failed), and the Prometheus text of /metrics read into numbers.

Stdlib only (http.client), so that a request can be cut at a chosen point: right after it is
sent, or after its first streamed chunk.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.parse
from dataclasses import dataclass, field

ABORT_BEFORE = "before"        # close the connection right after sending (queued / in prefill)
ABORT_AFTER_FIRST = "after_first"  # close it after the first streamed chunk (in decode)
ABORTED = "aborted"            # statuses that are not HTTP codes
BROKEN = "broken"              # a 200 stream that ended without its [DONE]: the server cut it
CONN_ERROR = "conn_error"      # refused, reset or timed out: the server failed the client


@dataclass
class Outcome:
    status: int | str          # HTTP code (a streamed error chunk's code), or one of the above
    ttft_s: float | None = None
    output_ids: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def is_server_error(self) -> bool:
        """5xx, a cut stream, or a connection the server refused, reset or left hanging."""
        return self.status in (BROKEN, CONN_ERROR) or \
            (isinstance(self.status, int) and self.status >= 500)

    @property
    def report(self) -> dict:
        """meta_info["kvcomm"][0] (docs/protocol.md), or {} for a request without one."""
        column = self.meta.get("kvcomm") or [None]
        return column[0] or {}


def send(url: str, body: dict, abort: str | None = None, timeout: float = 300,
         abort_delay_s: float = 0.0) -> Outcome:
    """POST ``body`` to ``url``/generate; ``body["stream"]`` decides how the answer is read."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        start = time.perf_counter()
        conn.request("POST", "/generate", json.dumps(body),
                     {"Content-Type": "application/json"})
        if abort == ABORT_BEFORE:
            time.sleep(abort_delay_s)
            return Outcome(ABORTED)
        resp = conn.getresponse()
        if resp.status != 200:
            return Outcome(resp.status, detail=resp.read(300).decode(errors="replace"))
        if not body.get("stream"):
            answer = json.loads(resp.read())
            return Outcome(200, None, answer.get("output_ids", []), answer.get("meta_info", {}))
        return _read_stream(resp, start, abort == ABORT_AFTER_FIRST)
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        return Outcome(CONN_ERROR, detail=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def _read_stream(resp, start: float, stop_after_first: bool) -> Outcome:
    ttft, last = None, None
    for line in resp:
        if line.strip() == b"data: [DONE]":
            if last is None:
                return Outcome(BROKEN, detail="[DONE] without any output")
            return Outcome(200, ttft, list(last.get("output_ids", [])), last.get("meta_info", {}))
        if not line.startswith(b"data:"):
            continue
        chunk = json.loads(line[5:])
        if "error" in chunk:
            error = chunk["error"]
            return Outcome(int(error.get("code", 400)), detail=str(error.get("message"))[:300])
        ttft = time.perf_counter() - start if ttft is None else ttft
        if stop_after_first:
            return Outcome(ABORTED, ttft)
        last = chunk
    return Outcome(BROKEN, ttft, detail="the stream ended without [DONE]")


# ---- /metrics ----------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text -> {sample name: [(labels, value)]}; comment lines are skipped."""
    samples: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        samples.setdefault(name, []).append((dict(_LABEL.findall(labels or "")), float(value)))
    return samples


def total(samples: dict, name: str) -> float | int | None:
    """The sum of ``name`` over its label sets (TP ranks, processes); None when it is absent."""
    rows = samples.get(name)
    return None if rows is None else _number(sum(value for _, value in rows))


def by_label(samples: dict, name: str, label: str) -> dict[str, float]:
    """{label value: sum of ``name`` over the other labels}."""
    out: dict[str, float] = {}
    for labels, value in samples.get(name, []):
        key = labels.get(label, "")
        out[key] = _number(out.get(key, 0) + value)
    return out


def _number(value: float) -> float | int:
    """Counts read as floats are shown as the integers they are."""
    return int(value) if float(value).is_integer() else value
