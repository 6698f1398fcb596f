"""The KVCOMM request protocol, version 1 (docs/protocol.md): decode, validate, encode, and the
checks every request gets at the HTTP edge.

A request carries its KVCOMM actions as ONE JSON string in
``sampling_params.custom_params["kvcomm"]`` (SGLang 0.5.17 passes custom_params unchanged to
the scheduler; its values must be JSON scalars) and its workflow namespace in ``extra_key``:
``kvcomm:`` + the workflow's secret id, optionally behind its application's secret id and a
dot (NAMESPACE_RE). Pure Python: shared by the server
(validation at the HTTP edge, planning in the scheduler) and the frontend (encoding). Every
check raises ValueError with a short ASCII reason (the server sends it back as HTTP 400).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from kvcomm_sglang.segments import parse_placeholder

VERSION = 1
CUSTOM_PARAMS_KEY = "kvcomm"
NAMESPACE_PREFIX = "kvcomm:"
# whole extra_key (fullmatch): kvcomm:<workflow id> or kvcomm:<application id>.<workflow id>
NAMESPACE_RE = re.compile(r"kvcomm:(?:([A-Za-z0-9_-]{22,128})\.)?([A-Za-z0-9_-]{22,128})")
MAX_EXTRA_KEY_BYTES = 4096          # any extra_key, KVCOMM or not
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_DEPTH = 4                       # the envelope is 3 deep: object > layout > piece
MAX_PIECES = 512
MAX_TOKENS = 2 ** 31 - 1            # bound of piece lengths and base.drop
ID_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")                 # whole id (fullmatch)
PLACEHOLDER_CHARS_RE = re.compile(r"[A-Za-z0-9_]{1,128}")
KEYS = {"v", "agent", "layout", "template", "base", "capture"}
MAX_SHOWN_CHARS = 64
# one JSON token that can nest: a string (closed or running to the end) or a bracket
_JSON_NESTING_RE = re.compile(r'"[^"\\]*(?:\\[\s\S][^"\\]*)*"?|[\[\]{}]')


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
    data = _load(custom_params[CUSTOM_PARAMS_KEY])
    unknown = set(data) - KEYS
    if unknown:
        raise ValueError(f"unknown KVCOMM hint fields {_show(sorted(unknown))}")
    version = data.get("v")
    if type(version) is not int or version != VERSION:
        raise ValueError(f"KVCOMM protocol version {_show(version)} is not supported "
                         f"(this server speaks v{VERSION})")
    agent = data.get("agent")
    if agent is not None:
        _id(agent, "agent")
    layout = _list(data.get("layout", []), "layout")
    if len(layout) > MAX_PIECES:
        raise ValueError(f"layout has {len(layout)} pieces, at most {MAX_PIECES} allowed")
    layout = tuple(_piece(i, p) for i, p in enumerate(layout))
    template = data.get("template", False)
    if not isinstance(template, bool):
        raise ValueError(f"template must be true or false, got {_show(template)}")
    return Hints(agent, layout, template, _base(data.get("base")), _capture(data.get("capture")))


def piece_spans(layout) -> list[tuple[Piece, int, int]]:
    """Each piece of a layout with its [start, end) in the prompt."""
    spans, pos = [], 0
    for piece in layout:
        spans.append((piece, pos, pos + piece.length))
        pos += piece.length
    return spans


def template_of(layout, ids) -> tuple[list[tuple[int, ...]], list[str]]:
    """A request's template, as its tokens say: the ids of its template pieces and the
    placeholders between them."""
    spans = piece_spans(layout)
    return ([tuple(ids[s:e]) for p, s, e in spans if p.kind == "template"],
            [p.placeholder for p, _, _ in spans if p.kind == "content"])


def validate(hints: Hints, num_input_ids: int, extra_key) -> None:
    """Consistency with the request itself; raises ValueError with the reason."""
    validate_namespace(extra_key)
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
            raise ValueError(f"a placeholder appears twice in the layout: {_show(names)}")
    elif hints.template:
        raise ValueError("a template registration needs its layout")
    if hints.base and not 0 <= hints.base[2] < num_input_ids:
        raise ValueError(f"base drop {hints.base[2]} must be in [0, {num_input_ids})")
    if hints.base and hints.layout:
        raise ValueError("a base request computes one message; it has no layout")


def validate_namespace(extra_key) -> str:
    """A KVCOMM namespace: extra_key = 'kvcomm:' + the workflow's secret id, or 'kvcomm:' +
    the application's secret id + '.' + the workflow's; each id 22 to 128 characters of
    [A-Za-z0-9_-] (secrets.token_urlsafe(16) makes 22). Returns it."""
    if not (isinstance(extra_key, str) and NAMESPACE_RE.fullmatch(extra_key)):
        raise ValueError(f"a KVCOMM request needs extra_key '{NAMESPACE_PREFIX}<workflow id>' or "
                         f"'{NAMESPACE_PREFIX}<application id>.<workflow id>' (its namespace; each "
                         "id is 22 to 128 characters of [A-Za-z0-9_-]), got "
                         f"{_show(extra_key)}")
    return extra_key


def split_namespace(extra_key: str) -> tuple[str, str]:
    """A namespace -> (application id, workflow id). A namespace without an application is an
    application of its own: its application id is its workflow id. Names that are not
    ``NAMESPACE_RE`` (the server's own tests use short ones) are one workflow, one application."""
    match = NAMESPACE_RE.fullmatch(extra_key)
    if match is None:
        name = extra_key.removeprefix(NAMESPACE_PREFIX)
        return name, name
    application, workflow = match.groups()
    return application or workflow, workflow


def validate_extra_key(extra_key) -> None:
    """Every request's extra_key: a string of at most MAX_EXTRA_KEY_BYTES (UTF-8) bytes, and a
    valid namespace when it starts with 'kvcomm:' (with or without hints)."""
    if extra_key is None:
        return
    if not isinstance(extra_key, str):
        raise ValueError(f"extra_key must be a string, got {_show(extra_key)}")
    if (len(extra_key) > MAX_EXTRA_KEY_BYTES
            or len(extra_key.encode("utf-8", "surrogatepass")) > MAX_EXTRA_KEY_BYTES):
        raise ValueError(f"extra_key is longer than {MAX_EXTRA_KEY_BYTES} bytes")
    if extra_key.startswith(NAMESPACE_PREFIX):
        validate_namespace(extra_key)


def validate_input_ids(input_ids, vocab_size: int) -> None:
    """Every prompt token must be an int in [0, vocab_size): SGLang 0.5.17 does not check, and
    one id outside the embedding table takes the whole server down."""
    if not isinstance(input_ids, (list, tuple)):
        raise ValueError(f"input_ids must be a list of token ids, got {_show(input_ids)}")
    for i, token in enumerate(input_ids):
        if type(token) is not int or not 0 <= token < vocab_size:
            raise ValueError(f"input_ids[{i}] = {_show(token)} is not a token id of this model: "
                             f"ids are integers in [0, {vocab_size})")


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


def _load(raw) -> dict:
    if not isinstance(raw, str):
        raise ValueError(f"custom_params[{CUSTOM_PARAMS_KEY!r}] must be a JSON string, got "
                         f"a {type(raw).__name__}")
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(f"KVCOMM hints are {size} bytes, more than {MAX_PAYLOAD_BYTES}")
    _check_depth(raw)
    try:
        data = json.loads(raw)
    except ValueError as exc:       # JSONDecodeError, integers past Python's digit limit
        raise ValueError(f"KVCOMM hints are not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("KVCOMM hints must be a JSON object")
    return data


def _check_depth(raw: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before parsing (the parser would recurse)."""
    depth = 0
    for match in _JSON_NESTING_RE.finditer(raw):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise ValueError(f"KVCOMM hints are nested deeper than {MAX_DEPTH} levels")
        elif token in ("]", "}"):
            depth -= 1


def _show(value) -> str:
    """A client's value, short and ASCII, for an error message (the reply is JSON: lone
    surrogates would not encode; the value may be huge)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (list, tuple, dict)):
        if len(value) > 8 or not all(isinstance(v, (str, int, float, type(None))) for v in value):
            return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, str) and len(value) > MAX_SHOWN_CHARS:
        value = value[:MAX_SHOWN_CHARS]
    text = ascii(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS - 3] + "..."


def _list(value, name):
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list, got {_show(value)}")
    return value


def _length(value, where: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_TOKENS:
        raise ValueError(f"{where} must be an integer in [0, {MAX_TOKENS}], got {_show(value)}")
    return value


def _piece(i: int, p) -> Piece:
    if not isinstance(p, dict) or p.get("t") not in ("template", "content"):
        raise ValueError(f"layout[{i}] must be an object with t = 'template' or 'content'")
    n = _length(p.get("n"), f"layout[{i}].n")
    fields = {"t", "n"} if p["t"] == "template" else {"t", "n", "ph", "id"}
    unknown = sorted(set(p) - fields)
    if unknown:
        raise ValueError(f"layout[{i}] ({p['t']}) has unknown fields {_show(unknown)}")
    if p["t"] == "template":
        return Piece("template", n)
    return Piece("content", n, _placeholder(p.get("ph"), f"layout[{i}].ph"),
                 _id(p.get("id"), f"layout[{i}].id"))


def _piece_json(p: Piece) -> dict:
    if p.kind == "template":
        return {"t": "template", "n": p.length}
    return {"t": "content", "n": p.length, "ph": p.placeholder, "id": p.message}


def _placeholder(name, where: str) -> str:
    if not (isinstance(name, str) and PLACEHOLDER_CHARS_RE.fullmatch(name)):
        raise ValueError(f"{where} must be a placeholder name ({PLACEHOLDER_CHARS_RE.pattern}), "
                         f"got {_show(name)}")
    try:
        parse_placeholder(name)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return name


def _id(value, where: str) -> str:
    if not (isinstance(value, str) and ID_RE.fullmatch(value)):
        raise ValueError(f"{where} must be an id matching {ID_RE.pattern}, got {_show(value)}")
    return value


def _base(value):
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"message", "placeholder", "drop"}:
        raise ValueError("base must be an object with message, placeholder and drop")
    return (_id(value["message"], "base.message"),
            _placeholder(value["placeholder"], "base.placeholder"),
            _length(value["drop"], "base.drop"))


def _capture(value):
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"message", "placeholder"}:
        raise ValueError("capture must be an object with message and placeholder")
    return (_id(value["message"], "capture.message"),
            _placeholder(value["placeholder"], "capture.placeholder"))
