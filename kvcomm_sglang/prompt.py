"""Find registered messages inside a prompt string and turn it into a KVCOMM layout.

Pure Python (no SGLang, no HTTP). A *message* is text whose exact token ids are known: an
earlier generation's output (``role`` = its producer) or shared input such as the user question
(``role`` None, computed by a base request). ``segment`` cuts a prompt into template text and
message occurrences; ``name_placeholders`` names each occurrence for the consumer. Shared by
``KVCommEndpoint`` (client side) and the server's auto mode (``runtime_patch/auto_*.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

STAND_IN = "{{'{}'}} "      # the official template-pass stand-in for a placeholder (spec §1.4)


@dataclass(frozen=True)
class Message:
    id: str                       # message id on the server (unique in the workflow)
    text: str                     # exactly as it appears in later prompts
    ids: tuple[int, ...]          # the token ids spliced in for it (captured / base ids)
    role: int | None              # producer role index; None: a program argument (base message)
    placeholder: str              # base: its placeholder; generated: the capture placeholder
    seq: int                      # creation order in the workflow
    agent: str | None = None      # generated: the producer's agent id (its role and prompt shape)


@dataclass(frozen=True)
class Segmented:
    texts: tuple[str, ...]            # template text pieces x0..xn
    messages: tuple[Message, ...]     # the messages between them, in prompt order

    @property
    def prefix(self) -> str:
        return self.texts[0]


class Unexpressible(ValueError):
    """The prompt holds messages that no v1 layout can name; send it without a layout."""


def segment(text: str, messages, min_chars: int = 12) -> Segmented:
    """Cut ``text`` at non-overlapping occurrences of ``messages`` (longest first). Several
    messages with the same text (two agents said the same) fill its occurrences oldest first;
    occurrences beyond them, and those that touch another one or end the prompt (the last piece
    must be template text), are left as template text."""
    by_text: dict[str, list[Message]] = {}
    for message in sorted(messages, key=lambda m: m.seq):
        if len(message.text) >= min_chars:
            by_text.setdefault(message.text, []).append(message)
    spans: list[tuple[int, int, Message]] = []
    for body in sorted(by_text, key=len, reverse=True):
        same, start, used = by_text[body], text.find(body), 0
        while start >= 0 and used < len(same):        # an occurrence per message, no more:
            end = start + len(body)                    # a text repeated 10 K times in a prompt
            if end < len(text) and all(end < s or start > e for s, e, _ in spans):
                spans.append((start, end, same[used]))     # costs no 10 K x spans checks
                used += 1
            start = text.find(body, end)
    spans.sort(key=lambda span: span[0])
    texts, found, pos = [], [], 0
    for start, end, message in spans:
        texts.append(text[pos:start])
        found.append(message)
        pos = end
    texts.append(text[pos:])
    return Segmented(tuple(texts), tuple(found))


def name_placeholders(found: Segmented, consumer_role: int) -> tuple[str, ...]:
    """Placeholder per occurrence: a base message keeps its own; a generated message of another
    role is ``agent_<n>_current`` (newest) / ``agent_<n>_history`` (the one before); the
    consumer's own earlier message is ``agent_<n>_history``. A role with more messages than
    that in one prompt (forks of one role prefix, each with its own instruction) is named per
    producing agent instead: ``agent_<n>x<k>_current`` for agent id ``n.k``. Raises
    Unexpressible when a name would still repeat (v1 allows each placeholder once per layout)."""
    by_role: dict[int, list[Message]] = {}
    for message in found.messages:
        if message.role is not None:
            by_role.setdefault(message.role, []).append(message)
    names_of: dict[str, str] = {}
    for role, group in by_role.items():
        kinds = ["history"] if role == consumer_role else ["current", "history"]
        newest_first = sorted({m.id: m for m in group}.values(), key=lambda m: -m.seq)
        if len(newest_first) <= len(kinds):
            names_of.update(_kind_names(newest_first, str(role), kinds))
            continue
        by_agent: dict[str, list[Message]] = {}
        for message in newest_first:
            by_agent.setdefault(message.agent or str(role), []).append(message)
        for agent, messages in by_agent.items():
            if len(messages) > 2:
                raise Unexpressible(f"{len(messages)} messages of agent {agent} in one prompt")
            names_of.update(_kind_names(messages, agent.replace(".", "x"), ["current", "history"]))
    names = tuple(names_of.get(m.id, m.placeholder) for m in found.messages)
    if len(set(names)) != len(names):
        raise Unexpressible(f"a placeholder would appear twice: {list(names)}")
    return names


def _kind_names(newest_first: list[Message], owner: str, kinds: list[str]) -> dict[str, str]:
    if len(newest_first) > len(kinds):
        raise Unexpressible(f"{len(newest_first)} messages of agent {owner} in one prompt")
    return {m.id: f"agent_{owner}_{kind}" for m, kind in zip(newest_first, kinds)}


def shape_key(found: Segmented, names: tuple[str, ...]) -> tuple:
    """What makes two prompts share one server-side template: same text pieces, same names."""
    return found.texts, names


def argument_placeholder(name: str, is_question: bool) -> str:
    """The question argument (named ``question``, ``query``, ``task``..., else the first string
    keyword argument) is the user question; the others are ``condition_<name>_current`` (the
    name with its non-alphanumerics removed)."""
    if is_question:
        return "user_question"
    cleaned = re.sub(r"[^A-Za-z0-9]", "", name) or "arg"
    return f"condition_{cleaned}_current"
