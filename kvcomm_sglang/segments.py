"""Prompt layout (spec §1.3–§1.4, §2.5): templates with placeholders, pieces, spans, keys.

A consumer prompt is ``x0 | c1 | x1 | ... | cn | xn``: template text pieces ``x_i`` of the
consumer's own template and content pieces ``c_i`` that fill placeholder ``phi_i``. Token
boundaries are forced at piece boundaries: each piece is tokenized on its own.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Sequence

PLACEHOLDER_RE = re.compile(r"\{([A-Za-z0-9_]+)\}")
PLACEHOLDER_NAME_RE = re.compile(r"^(user_question|(agent|condition)_([A-Za-z0-9]+)_(current|history))$")


def parse_placeholder(name: str) -> tuple[str, str | None, str | None]:
    """'agent_2_current' -> ('agent', '2', 'current'); 'user_question' -> ('user_question', None, None)."""
    match = PLACEHOLDER_NAME_RE.match(name)
    if not match:
        raise ValueError(f"unknown placeholder {{{name}}}: expected user_question, "
                         "agent_<id>_current|history or condition_<id>_current|history")
    if match.group(1) == "user_question":
        return "user_question", None, None
    return match.group(2), match.group(3), match.group(4)


def split_template(text: str) -> tuple[list[str], list[str]]:
    """Split a rendered template into text pieces x0..xn and placeholder names phi1..phin.

    Raises ValueError on unknown or repeated placeholders, adjacent placeholders and an empty
    final piece (it holds the assistant header, so a real template never ends in a placeholder).
    """
    texts, names, pos = [], [], 0
    for match in PLACEHOLDER_RE.finditer(text):
        parse_placeholder(match.group(1))
        if match.start() == pos and names:
            raise ValueError(f"placeholders {{{names[-1]}}} and {{{match.group(1)}}} are adjacent")
        if match.group(1) in names:
            raise ValueError(f"placeholder {{{match.group(1)}}} appears twice in one template")
        texts.append(text[pos:match.start()])
        names.append(match.group(1))
        pos = match.end()
    texts.append(text[pos:])
    if names and not texts[-1]:
        raise ValueError(f"template ends with placeholder {{{names[-1]}}}: the last piece must "
                         "hold the generation prompt")
    return texts, names


def segment_key(token_ids: Sequence[int], namespace: str = "") -> str:
    """Deterministic content key (same on every TP rank): hash of namespace and token ids."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(namespace.encode())
    digest.update(b"\x00")
    digest.update(",".join(map(str, token_ids)).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Piece:
    kind: str                      # "template" | "content"
    start: int                     # first position in the assembled prompt
    token_ids: tuple[int, ...]
    placeholder: str | None = None  # content: the placeholder it fills; template i>=1: the one before it
    index: int = 0                  # template piece index i, or content index i (1-based)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class PromptLayout:
    """The assembled prompt: pieces in order, with their spans."""

    pieces: tuple[Piece, ...]

    @classmethod
    def assemble(cls, template_ids: Sequence[Sequence[int]], placeholders: Sequence[str],
                 contents: dict[str, Sequence[int]]) -> "PromptLayout":
        if len(template_ids) != len(placeholders) + 1:
            raise ValueError(f"{len(placeholders)} placeholders need {len(placeholders) + 1} "
                             f"template pieces, got {len(template_ids)}")
        pieces, pos = [], 0
        for i, ids in enumerate(template_ids):
            if i:
                name = placeholders[i - 1]
                parse_placeholder(name)
                if name not in contents:
                    raise ValueError(f"no content for placeholder {{{name}}}")
                content = _ids(contents[name])
                pieces.append(Piece("content", pos, content, name, i))
                pos += len(content)
            pieces.append(Piece("template", pos, _ids(ids), placeholders[i - 1] if i else None, i))
            pos += len(ids)
        unknown = set(contents) - set(placeholders)
        if unknown:
            raise ValueError(f"contents name placeholders not in the template: {sorted(unknown)}")
        if pieces[-1].length == 0:
            raise ValueError("the last template piece is empty: nothing left to compute")
        return cls(tuple(pieces))

    @property
    def token_ids(self) -> list[int]:
        return [t for p in self.pieces for t in p.token_ids]

    @property
    def total_length(self) -> int:
        return self.pieces[-1].end

    @property
    def prefix_length(self) -> int:
        """Length of x0, the part an exact prefix cache serves."""
        return self.pieces[0].length

    def content_pieces(self) -> list[Piece]:
        return [p for p in self.pieces if p.kind == "content"]

    def template_piece(self, index: int) -> Piece:
        return next(p for p in self.pieces if p.kind == "template" and p.index == index)


def _ids(ids: Sequence[int]) -> tuple[int, ...]:
    """Token ids as a tuple of ints; a tuple is taken as it is (the planner's stored ids are
    tuples already, and converting a 1 K-token piece id by id costs ~50 us per request)."""
    return ids if type(ids) is tuple else tuple(map(int, ids))


@dataclass(frozen=True)
class Placement:
    """Spec §2.5 arithmetic: where each piece lands, and the official constant offsets."""

    content_starts: tuple[int, ...]
    template_starts: tuple[int, ...]     # x0..xn
    content_offsets: tuple[int, ...]     # o_ph,i = s_i + Delta_{i-1} - drop_i
    template_offsets: tuple[int, ...]    # o_pf,i = Delta_i (x0: 0)
    deltas: tuple[int, ...]              # Delta_1..Delta_n
    total_length: int


def place(template_lengths: Sequence[int], standin_lengths: Sequence[int],
          content_lengths: Sequence[int], drops: Sequence[int] | None = None) -> Placement:
    """Template pass positions (x_i, stand-in t_i) -> assembled positions for contents l_i."""
    n = len(standin_lengths)
    drops = [0] * n if drops is None else list(drops)
    if len(template_lengths) != n + 1 or len(content_lengths) != n or len(drops) != n:
        raise ValueError(f"place() needs n+1 template lengths and n stand-in, content and drop "
                         f"lengths; got {len(template_lengths)}, {n}, {len(content_lengths)}, "
                         f"{len(drops)}")
    for name, values in (("template", template_lengths), ("stand-in", standin_lengths),
                         ("content", content_lengths), ("drop", drops)):
        if any(v < 0 for v in values):
            raise ValueError(f"{name} lengths must be >= 0, got {list(values)}")
    starts_c, starts_t, off_c, off_t, deltas = [], [0], [], [0], []
    s, delta = template_lengths[0], 0
    for i in range(n):
        starts_c.append(s + delta)
        off_c.append(s + delta - drops[i])
        delta += content_lengths[i] - standin_lengths[i]
        deltas.append(delta)
        e = s + standin_lengths[i]
        starts_t.append(e + delta)
        off_t.append(delta)
        s = e + template_lengths[i + 1]
    return Placement(tuple(starts_c), tuple(starts_t), tuple(off_c), tuple(off_t), tuple(deltas),
                     s + delta)
