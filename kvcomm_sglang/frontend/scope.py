"""``workflow()``: the scope in which a KVCommEndpoint gives reuse, and its client-side state.

Inside ``with workflow(name):`` every ``gen`` sent through a ``KVCommEndpoint`` belongs to the
workflow namespace ``kvcomm:<name>``: its output becomes a message, later prompts that contain
it splice its exact token ids, and each agent (keyed by its prompt's text before the first
message) gets its template registered once per prompt shape. ``mode="dense"`` sends the very
same token ids without hints (the exact baseline). The scope is a ``contextvars`` variable, so
it follows SGLang's executor threads (they copy the context they are created in).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import uuid
from dataclasses import dataclass, field

from kvcomm_sglang.frontend.prompt import Message

MODES = ("kvcomm", "dense")
SHARED_ARGS = ("question", "user_question", "query", "task", "q", "context", "passages",
               "documents", "document")
MAX_SHAPES_PER_ROLE = 16
_current: contextvars.ContextVar["Workflow | None"] = contextvars.ContextVar(
    "kvcomm_workflow", default=None)


@dataclass
class CallRecord:
    """One gen call as the client saw it (RunResult.calls rows come from these)."""

    role: int
    agent: str                    # the server-side agent id (role, or role.shape)
    ttft_s: float
    mode: str                     # "reuse" | "dense"
    reused_tokens: int
    prompt_tokens: int
    fallback_reason: str | None
    text: str = ""
    message: str | None = None    # the message id its output was registered as


@dataclass
class Workflow:
    name: str
    mode: str = "kvcomm"
    min_message_chars: int = 12
    shared_args: tuple[str, ...] = SHARED_ARGS     # program kwargs that are shared content
    messages: dict[str, Message] = field(default_factory=dict)    # text -> newest message
    produced: list[Message] = field(default_factory=list)         # every generated message
    roles: dict[str, int] = field(default_factory=dict)           # prompt prefix -> role index
    shapes: dict[tuple, str] = field(default_factory=dict)        # (role, shape) -> agent id
    sent_bases: set[str] = field(default_factory=set)
    calls: list[CallRecord] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _seq: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"workflow mode must be one of {MODES}, got {self.mode!r}")

    @property
    def namespace(self) -> str | None:
        return f"kvcomm:{self.name}" if self.mode == "kvcomm" else None

    def next_seq(self) -> int:
        with self.lock:
            self._seq += 1
            return self._seq

    def role_of(self, prefix: str) -> int:
        with self.lock:
            return self.roles.setdefault(prefix, len(self.roles))

    def agent_id(self, role: int, shape: tuple) -> tuple[str | None, bool]:
        """-> (server agent id, is new); (None, False) past MAX_SHAPES_PER_ROLE shapes."""
        with self.lock:
            key = (role, shape)
            if key in self.shapes:
                return self.shapes[key], False
            count = sum(1 for r, _ in self.shapes if r == role)
            if count >= MAX_SHAPES_PER_ROLE:
                return None, False
            self.shapes[key] = str(role) if count == 0 else f"{role}.{count}"
            return self.shapes[key], True

    def add_message(self, text: str, ids, role: int | None, placeholder: str,
                    prefix: str = "m", message_id: str | None = None) -> Message:
        with self.lock:
            seq = self.next_seq()
            message = Message(message_id or f"{prefix}{seq}", text, tuple(ids), role, placeholder, seq)
            self.messages[text] = message
            if role is not None:
                self.produced.append(message)
            return message

    def candidates(self) -> list[Message]:
        """Messages a prompt may contain: program arguments and every generated message."""
        with self.lock:
            return [m for m in self.messages.values() if m.role is None] + list(self.produced)

    def argument_message(self, text: str, placeholder: str, tokenize) -> Message:
        with self.lock:
            known = self.messages.get(text)
            if known is not None:
                return known
            return self.add_message(text, tokenize(text), None, placeholder, prefix="u")


@contextlib.contextmanager
def workflow(name: str | None = None, mode: str = "kvcomm", min_message_chars: int = 12,
             shared_args=SHARED_ARGS):
    """Scope of one KVCOMM workflow; yields its ``Workflow`` (calls, messages). A fresh name
    (default: random) starts with empty server state: templates and anchors warm up again.
    ``shared_args``: program keyword arguments (e.g. ``question``) sent once as base messages."""
    wf = Workflow(name or uuid.uuid4().hex[:12], mode, min_message_chars, tuple(shared_args))
    token = _current.set(wf)
    try:
        yield wf
    finally:
        _current.reset(token)


@contextlib.contextmanager
def use(wf: Workflow):
    """Re-enter an existing workflow (e.g. one question after another in the same namespace)."""
    token = _current.set(wf)
    try:
        yield wf
    finally:
        _current.reset(token)


def current_workflow() -> Workflow | None:
    return _current.get()
