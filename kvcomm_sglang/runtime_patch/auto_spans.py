"""Auto mode, step 1: where the shared spans of a plain prompt are, in tokens (pure Python).

The server's auto mode (``--kvcomm-auto``, docs/protocol.md) sees a prompt as SGLang tokenized
it: the text ``T``, its token ids ``P`` and each token's character span. A span of ``T`` is
shared content when it is a message of the workflow (an earlier output or shared input, found
by its text, longest first: ``prompt.segment``), or a chat message's whole content that holds no
known message (new shared input). Spans become token ranges ``[i, j)`` whose tokens lie wholly
inside the span; the prompt's own ids are kept (a dense fallback is exactly vanilla SGLang).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcomm_sglang.prompt import Message, segment

MIN_SPAN_TOKENS = 4            # shorter content is left as template text


@dataclass(frozen=True)
class Span:
    start: int                 # first token
    end: int                   # one past the last token
    text: str                  # the characters its tokens cover
    message: Message | None    # the workflow message found there (None: new shared input)


def char_spans(text: str, messages, contents, min_chars: int) -> list[tuple[int, int, Message | None]]:
    """Character spans of known ``messages`` in ``text`` (non-overlapping, longest first, never
    at the very end), then of ``contents`` (chat message contents, in prompt order) that touch
    none of them."""
    found = segment(text, messages, min_chars)
    spans, pos = [], len(found.texts[0])
    for message, piece in zip(found.messages, found.texts[1:]):
        spans.append((pos, pos + len(message.text), message))
        pos += len(message.text) + len(piece)
    cursor = 0
    for content in contents:
        start = text.find(content, cursor) if len(content) >= min_chars else -1
        if start < 0:
            continue
        end = cursor = start + len(content)
        if end < len(text) and all(end <= s or start >= e for s, e, _ in spans):
            spans.append((start, end, None))
    return sorted(spans, key=lambda span: span[0])


def token_spans(text: str, offsets, spans, min_tokens: int = MIN_SPAN_TOKENS) -> list[Span]:
    """Character spans -> token ranges of the tokens wholly inside each (a token that straddles
    a border, e.g. a space merged into the next word, stays template text). Ranges that touch
    the previous one, reach the last token, or have fewer than ``min_tokens`` tokens are
    dropped."""
    out: list[Span] = []
    n, i = len(offsets), 0
    for start, end, message in spans:
        while i < n and offsets[i][0] < start:
            i += 1
        j = i
        while j < n and offsets[j][1] <= end and _inside(offsets, j, start):
            j += 1
        if j - i < min_tokens or j >= n or (out and out[-1].end >= i) or i == 0:
            continue
        out.append(Span(i, j, text[offsets[i][0]:offsets[j - 1][1]], message))
        i = j
    return out


def _inside(offsets, k: int, start: int) -> bool:
    """Token ``k`` starts inside the span and does not share characters with the token before
    it (byte-level tokens split one character; such a pair stays together)."""
    return offsets[k][0] >= start and (k == 0 or offsets[k][0] >= offsets[k - 1][1]
                                       or offsets[k - 1][0] >= start)
