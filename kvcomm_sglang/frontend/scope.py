"""``workflow()``: the scope in which a KVCommEndpoint gives reuse, and its client-side state.

Inside ``with workflow(name):`` every ``gen`` sent through a ``KVCommEndpoint`` belongs to the
workflow's namespace ``kvcomm:<secret>``: its output becomes a message, later prompts that
contain it splice its exact token ids, and each agent (keyed by its prompt's text before the
first message) gets its template registered once per prompt shape. ``mode="dense"`` sends the
very same token ids without hints (the exact baseline). The scope is a ``contextvars`` variable,
so it follows SGLang's executor threads (they copy the context they are created in).

The secret (``secrets.token_urlsafe(16)``: 22 characters, 128 random bits) is the workflow's
only credential on the server: whoever holds it can read and change the workflow's messages and
templates, nobody else can guess it. ``name`` is a label for people and logs; two workflows with
the same name never share state. ``use(wf)`` re-enters the same namespace.

Workflows of one ``Application`` (``workflow(application=app)``; ``application()`` makes one,
with its own secret) share the server's templates and anchors for their agents: namespace
``kvcomm:<application secret>.<workflow secret>``. A new workflow of a warm application reuses
from its first call and sends no template pass the application has sent already. Share an
application only between workflows whose texts may inform each other's (docs/isolation.md).

A message needs no request of its own: the server takes its base KV from the first call that
computes it (a program argument inside the first prompt that holds it, an answer from its own
generation). The server may forget a workflow (its namespace evicted, a restart): a call then
falls back to dense with ``unknown_template`` (the workflow marks the agent in
``missing_templates`` and sends its template pass again before its next call) or
``unknown_message`` (that dense call stores the message again when the store has room).
"""

from __future__ import annotations

import contextlib
import contextvars
import secrets
import threading
from dataclasses import dataclass, field

from kvcomm_sglang.prompt import Message

MODES = ("kvcomm", "dense")
SHARED_ARGS = ("question", "user_question", "query", "task", "q", "context", "passages",
               "documents", "document")
MAX_SHAPES_PER_ROLE = 16
SECRET_BYTES = 16               # token_urlsafe(16): 22 base64url characters, 128 random bits
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
class Application:
    """Workflows that share the server's templates and anchors; ``secret`` names it there."""

    name: str = "application"
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(SECRET_BYTES), repr=False)
    templates: set = field(default_factory=set)       # template shapes the server was sent
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)


def application(name: str | None = None) -> Application:
    """A new application (a new secret): pass it to ``workflow(application=...)`` or
    ``AgentGraph(..., application=...)`` in every workflow that should share anchors."""
    return Application(name or "application")


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
    missing_templates: set[str] = field(default_factory=set)      # agents to register (again)
    calls: list[CallRecord] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(SECRET_BYTES), repr=False)
    application: Application | None = None
    shapes_of: dict[str, tuple] = field(default_factory=dict)     # agent id -> template shape
    _seq: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"workflow mode must be one of {MODES}, got {self.mode!r}")

    @property
    def namespace(self) -> str | None:
        if self.mode != "kvcomm":
            return None
        app = self.application
        return f"kvcomm:{app.secret}.{self.secret}" if app else f"kvcomm:{self.secret}"

    def next_seq(self) -> int:
        with self.lock:
            self._seq += 1
            return self._seq

    def role_of(self, prefix: str) -> int:
        with self.lock:
            return self.roles.setdefault(prefix, len(self.roles))

    def agent_id(self, role: int, shape: tuple) -> str | None:
        """The server agent id of this prompt shape (a new one joins ``missing_templates``);
        None past MAX_SHAPES_PER_ROLE shapes."""
        with self.lock:
            key = (role, shape)
            if key in self.shapes:
                return self.shapes[key]
            count = sum(1 for r, _ in self.shapes if r == role)
            if count >= MAX_SHAPES_PER_ROLE:
                return None
            self.shapes[key] = agent = str(role) if count == 0 else f"{role}.{count}"
            self.missing_templates.add(agent)
            return agent

    def add_message(self, text: str, ids, role: int | None, placeholder: str,
                    prefix: str = "m", message_id: str | None = None,
                    agent: str | None = None) -> Message:
        with self.lock:
            seq = self.next_seq()
            message = Message(message_id or f"{prefix}{seq}", text, tuple(ids), role, placeholder,
                              seq, agent)
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

    def needs_template(self, agent: str, shape: tuple = ()) -> bool:
        """Whether ``agent``'s template pass must be sent before its call: a new agent, or one
        the server said it does not know, unless another workflow of the application sent
        the same template (``shape``: its text pieces and placeholders)."""
        with self.lock:
            self.shapes_of[agent] = shape
            if agent not in self.missing_templates:
                return False
            if self.application is not None and shape in self.application.templates:
                self.missing_templates.discard(agent)
                return False
            return True

    def sent_template(self, agent: str) -> None:
        with self.lock:
            self.missing_templates.discard(agent)
            if self.application is not None and agent in self.shapes_of:
                with self.application.lock:
                    self.application.templates.add(self.shapes_of[agent])

    def forget(self, reason: str | None, agent: str) -> None:
        """The server answered a call with ``reason``: an unknown template is sent again (an
        unknown message needs nothing: the dense call that reported it stored it again)."""
        with self.lock:
            if reason == "unknown_template":
                self.missing_templates.add(agent)
                if self.application is not None:
                    with self.application.lock:
                        self.application.templates.discard(self.shapes_of.get(agent))


@contextlib.contextmanager
def workflow(name: str | None = None, mode: str = "kvcomm", min_message_chars: int = 12,
             shared_args=SHARED_ARGS, application: Application | None = None):
    """Scope of one new KVCOMM workflow; yields its ``Workflow`` (calls, messages). Each call
    makes a new secret namespace, whatever ``name`` (a label only) says; ``use(wf)`` re-enters
    one. Without ``application`` its templates and anchors warm up from nothing; with one, it
    shares those of the application's other workflows. ``shared_args``: program keyword
    arguments (e.g. ``question``) sent once as base messages."""
    wf = Workflow(name or "workflow", mode, min_message_chars, tuple(shared_args),
                  application=application)
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
