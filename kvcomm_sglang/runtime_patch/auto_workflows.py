"""Auto mode, step 2: what the launcher knows of each workflow, and one plain call as hints.

Pure Python (no SGLang): the hooks in ``auto.py`` feed it prompts and outputs. Per workflow
namespace it keeps the messages (earlier outputs and shared inputs: text, token ids, producer),
the agents (an agent is its prompt's token prefix before the first shared span: its role; each
distinct template text of a role is one server-side agent id, as ``KVCommEndpoint`` does), and
which templates and messages the server holds. ``AutoWorkflow.plan`` turns one prompt into the
request's KVCOMM hints plus the template pass it needs first. No message needs a request of its
own: an output is captured from its producer's decode, and shared input (or an output the
prompt tokenizes otherwise) is stored by the server from the prefill of the first call that
holds it, computed densely (``capture.first_computed``). Everything is bounded: messages,
roles, shapes per role, workflows (least recently used go first).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import itertools
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from kvcomm_sglang import protocol
from kvcomm_sglang.prompt import STAND_IN, Message, Segmented, Unexpressible, name_placeholders
from kvcomm_sglang.runtime_patch.auto_spans import Span

MAX_WORKFLOWS = 1024
MAX_MESSAGES = 256             # per workflow; the oldest are forgotten first
MAX_ROLES = 64
MAX_SHAPES_PER_ROLE = 16
MIN_MESSAGE_CHARS = 12


def namespace_for(server_secret: bytes, tenant: str, workflow: str) -> str:
    """The request's KVCOMM namespace: ``kvcomm:<application>.<workflow>``, both ids keyed
    hashes (HMAC-SHA256 under the server's random secret) of what identifies them: the
    application of a tenant is its credential (the API key, and the request's cache salt), the
    workflow that plus the client's workflow id. Nobody can name another tenant's workflow
    without its key; the server forgets the mapping at restart (a new secret)."""
    application = _keyed_id(server_secret, "application", tenant)
    return f"{protocol.NAMESPACE_PREFIX}{application}.{_keyed_id(server_secret, tenant, workflow)}"


def _keyed_id(secret: bytes, *parts: str) -> str:
    digest = hmac.new(secret, "\x00".join(parts).encode("utf-8", "surrogatepass"),
                      hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")


@dataclass
class AutoCall:
    """One plain request made a KVCOMM request: its hints, and what must be sent first."""

    hints: dict                                   # custom_params entry
    role: int
    agent: str | None                             # None: no layout (it only captures)
    capture: tuple[str, str]                      # (message id, placeholder)
    messages: tuple[Message, ...] = ()            # the prompt's messages, in order
    template_pass: tuple[list[int], dict] | None = None     # (ids, custom_params)
    first_computed: int = 0                       # its messages the server does not hold yet
    reason: str | None = None                     # why the prompt has no layout


@dataclass
class AutoWorkflow:
    namespace: str
    messages: OrderedDict = field(default_factory=OrderedDict)     # id -> Message, oldest first
    by_text: dict = field(default_factory=dict)                    # text -> newest Message
    by_ids: dict = field(default_factory=dict)                     # token ids -> newest Message
    variants: dict = field(default_factory=dict)   # (message id, ids) -> its re-tokenized copy
    roles: OrderedDict = field(default_factory=OrderedDict)        # prefix ids -> role (LRU)
    shapes: dict = field(default_factory=dict)                     # (role, shape) -> agent id
    on_server: set = field(default_factory=set)                    # message ids held there
    templates_sent: set = field(default_factory=set)               # agents registered there
    template_sends: dict = field(default_factory=dict, repr=False)  # agent -> its pass in flight
    _seq: itertools.count = field(default_factory=lambda: itertools.count(1), repr=False)
    _roles: itertools.count = field(default_factory=itertools.count, repr=False)

    def candidates(self) -> list[Message]:
        return list(self.messages.values())

    def add(self, text: str, ids, role: int | None, placeholder: str, agent: str | None = None,
            message_id: str | None = None, on_server: bool = False) -> Message:
        seq = next(self._seq)
        message = Message(message_id or f"u{seq}", text, tuple(ids), role, placeholder, seq, agent)
        self.messages[message.id] = message
        self.by_text[text] = self.by_ids[message.ids] = message
        if on_server:
            self.on_server.add(message.id)
        while len(self.messages) > MAX_MESSAGES:
            self._drop(self.messages.popitem(last=False)[1])
        return message

    def _drop(self, message: Message) -> None:
        self.on_server.discard(message.id)
        for key in [k for k in self.variants if k[0] == message.id]:
            self.on_server.discard(self.variants.pop(key).id)
        if self.by_text.get(message.text) is message:
            del self.by_text[message.text]
        if self.by_ids.get(message.ids) is message:
            del self.by_ids[message.ids]

    def next_capture_id(self) -> str:
        return f"m{next(self._seq)}"

    def role_of(self, prefix: tuple[int, ...]) -> int:
        """The role of a prompt prefix; at ``MAX_ROLES`` the least recently used role is
        forgotten (with its prompt shapes) and numbers are never reused, so a workflow whose
        prompts have no shared span (each a "role" of its own) cannot lock every later agent
        out of reuse, and a returning prefix is only a new, cold role."""
        role = self.roles.get(prefix)
        if role is None:
            if len(self.roles) >= MAX_ROLES:
                _, old = self.roles.popitem(last=False)
                for key in [k for k in self.shapes if k[0] == old]:
                    del self.shapes[key]
            role = self.roles[prefix] = next(self._roles)
        self.roles.move_to_end(prefix)
        return role

    def agent_id(self, role: int, shape: tuple) -> str | None:
        key = (role, shape)
        if key not in self.shapes:
            count = sum(1 for r, _ in self.shapes if r == role)
            if count >= MAX_SHAPES_PER_ROLE:
                return None
            self.shapes[key] = str(role) if count == 0 else f"{role}.{count}"
        return self.shapes[key]

    def finished(self, reason: str | None, call: AutoCall) -> None:
        """The server answered ``call`` (``reason``: its fallback reason). Its messages are held
        there now: a dense call stored the ones it computed first (``unknown_message`` too: a
        message the server lost is stored again). A lost template is sent again next time."""
        if reason == "unknown_template":
            self.templates_sent.discard(call.agent)
        if call.agent is not None:        # not those forgotten meanwhile: on_server stays bounded
            live = set(self.messages) | {v.id for v in self.variants.values()}
            self.on_server.update(m.id for m in call.messages if m.id in live)

    # ---- one prompt ----
    def plan(self, ids: list[int], spans: list[Span], tokenize) -> AutoCall:
        """``spans`` (from ``auto_spans.token_spans``) -> the call's hints; new shared input
        becomes a message (computed first by this call), a template seen first a template
        pass."""
        messages = tuple(self._message_at(ids, span) for span in spans)
        bounds = [0] + [b for s in spans for b in (s.start, s.end)] + [len(ids)]
        pieces = [tuple(ids[bounds[k]:bounds[k + 1]]) for k in range(0, len(bounds), 2)]
        role = self.role_of(pieces[0])
        capture = (self.next_capture_id(), f"agent_{role}_current")
        if not messages:
            return AutoCall(protocol.encode(capture=capture), role, None, capture)
        try:
            names = name_placeholders(Segmented(tuple(map(str, pieces)), _named(messages)), role)
        except Unexpressible as exc:
            return AutoCall(protocol.encode(capture=capture), role, None, capture,
                            reason=f"auto:{exc}")
        agent = self.agent_id(role, (tuple(pieces), names))
        if agent is None:
            return AutoCall(protocol.encode(capture=capture), role, None, capture,
                            reason="auto:too_many_prompt_shapes")
        layout = [protocol.Piece("template", len(pieces[0]))]
        for message, name, piece in zip(messages, names, pieces[1:]):
            layout += [protocol.Piece("content", len(message.ids), name, message.id),
                       protocol.Piece("template", len(piece))]
        call = AutoCall(protocol.encode(agent=agent, layout=layout, capture=capture), role, agent,
                        capture, messages)
        if agent not in self.templates_sent:
            call.template_pass = _template_pass(agent, pieces, names, tokenize)
        call.first_computed = sum(m.id not in self.on_server for m in dict.fromkeys(messages))
        return call

    def _message_at(self, ids: list[int], span: Span) -> Message:
        """The message whose exact ids fill ``span``. The message found there if its ids match;
        else its copy with these ids (the prompt tokenizes its text otherwise than it was
        generated): same producer, so the same placeholder; its base KV comes from the first
        call that holds it. New shared input: any shared input with these ids, else a new
        message (the same)."""
        piece = tuple(ids[span.start:span.end])
        origin = span.message
        if origin is not None and origin.ids == piece:
            return origin
        if origin is not None:
            key = (origin.id, piece)
            if key not in self.variants:
                self.variants[key] = dataclasses.replace(
                    origin, id=f"{origin.id}.{next(self._seq)}", ids=piece)
            return self.variants[key]
        known = self.by_ids.get(piece)
        if known is not None and known.role is None:
            return known
        return self.add(span.text, piece, None, "user_question")


def _named(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """Shared input is named by its rank among the prompt's shared inputs (the first is the
    user question, then condition_2_current, ...), so one agent's prompts name it alike."""
    out, rank = [], 0
    for message in messages:
        if message.role is None:
            rank += 1
            name = "user_question" if rank == 1 else f"condition_{rank}_current"
            message = dataclasses.replace(message, placeholder=name)
        out.append(message)
    return tuple(out)


def _template_pass(agent: str, pieces, names, tokenize) -> tuple[list[int], dict]:
    ids = list(pieces[0])
    layout = [protocol.Piece("template", len(pieces[0]))]
    for name, piece in zip(names, pieces[1:]):
        stand_in = tokenize(STAND_IN.format(name))
        layout += [protocol.Piece("content", len(stand_in), name, "standin"),
                   protocol.Piece("template", len(piece))]
        ids += list(stand_in) + list(piece)
    return ids, protocol.encode(agent=agent, layout=layout, template=True)


class WorkflowTable:
    """Auto workflows by namespace, at most ``MAX_WORKFLOWS``. When full, the tenant (the
    namespace's application) with the most workflows forgets its least recently used one, so a
    client minting workflow ids only ever pushes out its own tenant's (the server's state is
    bounded and evicted by the server on its own)."""

    def __init__(self, limit: int = MAX_WORKFLOWS):
        self.limit = limit
        self.workflows: OrderedDict[str, AutoWorkflow] = OrderedDict()

    def get(self, namespace: str) -> AutoWorkflow:
        wf = self.workflows.get(namespace)
        if wf is None:
            wf = self.workflows[namespace] = AutoWorkflow(namespace)
            while len(self.workflows) > self.limit:
                self._forget_one()
        self.workflows.move_to_end(namespace)
        return wf

    def _forget_one(self) -> None:
        tenants = Counter(protocol.split_namespace(ns)[0] for ns in self.workflows)
        largest = max(tenants, key=tenants.get)
        oldest = next(ns for ns in self.workflows if protocol.split_namespace(ns)[0] == largest)
        del self.workflows[oldest]
