"""The KVCOMM request protocol, version 1 (docs/protocol.md): decode, validate, encode.

A request carries its KVCOMM actions as ONE JSON string in
``sampling_params.custom_params["kvcomm"]`` (SGLang 0.5.17 passes custom_params unchanged to
the scheduler; its values must be JSON scalars) and its workflow namespace in ``extra_key``,
which must start with ``kvcomm:``. Pure Python: shared by the server (validation at the HTTP
edge, planning in the scheduler) and the frontend (encoding).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from kvcomm_sglang.segments import parse_placeholder

VERSION = 1
CUSTOM_PARAMS_KEY = "kvcomm"
NAMESPACE_PREFIX = "kvcomm:"
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_PIECES = 512
ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
KEYS = {"v", "agent", "layout", "template", "base", "capture"}


@dataclass(frozen=True)
class Piece:
    kind: str                       # "template" | "content"
    length: int
    placeholder: str | None = None  # content pieces
    message: str | None = None      # content pieces: the message id filling the placeholder


@dataclass(frozen=True)
class Hints:
    agent: str | None = None
    layout: tuple[Piece, ...] = ()
    template: bool = False          # this request is the agent's template pass (stand-in contents)
    base: tuple[str, str, int] | None = None      # (message, placeholder, drop): ids[drop:] is the message
    capture: tuple[str, str] | None = None        # (message, placeholder): the output becomes the message

    @property
    def consumes(self) -> list[str]:
        """Message ids this request's prompt is assembled from (a reuse candidate)."""
        if self.template:
            return []
        return [p.message for p in self.layout if p.kind == "content"]

    @property
    def produces(self) -> list[str]:
        out = [self.base[0]] if self.base else []
        return out + ([self.capture[0]] if self.capture else [])


def decode(custom_params) -> Hints | None:
    """custom_params dict (or None) -> Hints, or None when the request carries no KVCOMM actions.
    Raises ValueError naming the problem on any malformed payload."""
    if not isinstance(custom_params, dict) or CUSTOM_PARAMS_KEY not in custom_params:
        return None
    raw = custom_params[CUSTOM_PARAMS_KEY]
    if not isinstance(raw, str):
        raise ValueError(f"custom_params[{CUSTOM_PARAMS_KEY!r}] must be a JSON string")
    if len(raw.encode()) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"KVCOMM hints are {len(raw.encode())} bytes, more than "
                         f"{MAX_PAYLOAD_BYTES}")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"KVCOMM hints are not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("KVCOMM hints must be a JSON object")
    unknown = set(data) - KEYS
    if unknown:
        raise ValueError(f"unknown KVCOMM hint fields {sorted(unknown)}")
    if data.get("v") != VERSION:
        raise ValueError(f"KVCOMM protocol version {data.get('v')!r} is not supported "
                         f"(this server speaks v{VERSION})")
    agent = data.get("agent")
    if agent is not None and not (isinstance(agent, str) and ID_RE.match(agent)):
        raise ValueError(f"agent must be an id matching {ID_RE.pattern}, got {agent!r}")
    layout = tuple(_piece(i, p) for i, p in enumerate(_list(data.get("layout", []), "layout")))
    if len(layout) > MAX_PIECES:
        raise ValueError(f"layout has {len(layout)} pieces, at most {MAX_PIECES} allowed")
    template = data.get("template", False)
    if not isinstance(template, bool):
        raise ValueError("template must be true or false")
    return Hints(agent, layout, template, _base(data.get("base")), _capture(data.get("capture")))


def validate(hints: Hints, num_input_ids: int, extra_key: str | None) -> None:
    """Consistency with the request itself; raises ValueError with the reason."""
    if not (isinstance(extra_key, str) and extra_key.startswith(NAMESPACE_PREFIX)
            and len(extra_key) > len(NAMESPACE_PREFIX)):
        raise ValueError(f"a KVCOMM request needs extra_key '{NAMESPACE_PREFIX}<workflow>' "
                         f"(its namespace), got {extra_key!r}")
    if hints.layout:
        if hints.agent is None:
            raise ValueError("a KVCOMM layout needs the consuming agent's id ('agent')")
        total = sum(p.length for p in hints.layout)
        if total != num_input_ids:
            raise ValueError(f"layout lengths sum to {total}, the prompt has {num_input_ids} "
                             "tokens")
        kinds = [p.kind for p in hints.layout]
        expected = ["template" if i % 2 == 0 else "content" for i in range(len(kinds))]
        if kinds != expected or kinds[-1] != "template":
            raise ValueError("layout must alternate template and content pieces, starting and "
                             "ending with a template piece")
        if hints.layout[-1].length == 0:
            raise ValueError("the last template piece is empty: nothing left to compute")
        names = [p.placeholder for p in hints.layout if p.kind == "content"]
        if len(set(names)) != len(names):
            raise ValueError(f"a placeholder appears twice in the layout: {names}")
    elif hints.template:
        raise ValueError("a template registration needs its layout")
    if hints.base and not 0 <= hints.base[2] < num_input_ids:
        raise ValueError(f"base drop {hints.base[2]} must be in [0, {num_input_ids})")
    if hints.base and hints.layout:
        raise ValueError("a base request computes one message; it has no layout")


def encode(**fields) -> dict:
    """Build the custom_params entry: encode(agent=..., layout=[...], capture=...)."""
    payload = {"v": VERSION}
    for key, value in fields.items():
        if value is None or value is False or value == []:
            continue
        if key == "layout":
            value = [_piece_json(p) for p in value]
        elif key == "base":
            value = dict(zip(("message", "placeholder", "drop"), value))
        elif key == "capture":
            value = dict(zip(("message", "placeholder"), value))
        payload[key] = value
    hints = json.dumps(payload, separators=(",", ":"))
    decode({CUSTOM_PARAMS_KEY: hints})          # never send what a server would refuse
    return {CUSTOM_PARAMS_KEY: hints}


def _list(value, name):
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list")
    return value


def _piece(i: int, p) -> Piece:
    if not isinstance(p, dict) or p.get("t") not in ("template", "content"):
        raise ValueError(f"layout[{i}] must be an object with t = 'template' or 'content'")
    n = p.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"layout[{i}].n must be a non-negative integer, got {n!r}")
    if p["t"] == "template":
        if set(p) - {"t", "n"}:
            raise ValueError(f"layout[{i}] (template) has unknown fields {sorted(set(p) - {'t', 'n'})}")
        return Piece("template", n)
    if set(p) - {"t", "n", "ph", "id"}:
        raise ValueError(f"layout[{i}] (content) has unknown fields "
                         f"{sorted(set(p) - {'t', 'n', 'ph', 'id'})}")
    _placeholder(p.get("ph"), f"layout[{i}].ph")
    return Piece("content", n, p["ph"], _id(p.get("id"), f"layout[{i}].id"))


def _piece_json(p: Piece) -> dict:
    if p.kind == "template":
        return {"t": "template", "n": p.length}
    return {"t": "content", "n": p.length, "ph": p.placeholder, "id": p.message}


def _placeholder(name, where: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{where} must be a placeholder name")
    try:
        parse_placeholder(name)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return name


def _id(value, where: str) -> str:
    if not (isinstance(value, str) and ID_RE.match(value)):
        raise ValueError(f"{where} must be an id matching {ID_RE.pattern}, got {value!r}")
    return value


def _base(value):
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"message", "placeholder", "drop"}:
        raise ValueError("base must be an object with message, placeholder and drop")
    drop = value["drop"]
    if not isinstance(drop, int) or isinstance(drop, bool) or drop < 0:
        raise ValueError(f"base.drop must be a non-negative integer, got {drop!r}")
    return (_id(value["message"], "base.message"), _placeholder(value["placeholder"],
            "base.placeholder"), drop)


def _capture(value):
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"message", "placeholder"}:
        raise ValueError("capture must be an object with message and placeholder")
    return (_id(value["message"], "capture.message"),
            _placeholder(value["placeholder"], "capture.placeholder"))
