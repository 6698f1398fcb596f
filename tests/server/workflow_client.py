"""Drive the 3-agent workflow through a real server's /generate with KVCOMM hints (protocol v1).

Template pieces and messages are token ids spliced exactly (spec §1.4): the dense comparison
sends the same input_ids without hints.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from dataclasses import dataclass

import requests

from kvcomm_sglang import protocol
from kvcomm_sglang.models import default_model_dir
from tests.harness import workflow


_TOKENIZER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())


def tokenizer():
    """The model's tokenizer, loaded once. Threads that ask first wait for one load: the lazy
    ``from transformers import AutoTokenizer`` raced in benchmarks/agreement.py's streams
    (ImportError in one of five threads)."""
    with _TOKENIZER_LOCK:
        return _load_tokenizer()


def encode(text: str) -> list[int]:
    return list(tokenizer()(text, add_special_tokens=False)["input_ids"])


def render_chat(system: str, user: str) -> str:
    return tokenizer().apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": user}],
        tokenize=False, add_generation_prompt=True)


@dataclass
class Result:
    output_ids: list[int]
    meta: dict
    ttft_s: float

    @property
    def kvcomm(self) -> dict | None:
        column = self.meta.get("kvcomm")
        return column[0] if column else None


def generate(url: str, input_ids, max_new_tokens: int, hints: dict | None = None,
             namespace: str | None = None, timeout: float = 300) -> Result:
    params = {"temperature": 0, "max_new_tokens": max_new_tokens}
    if hints is not None:
        params["custom_params"] = hints
    body = {"input_ids": list(input_ids), "sampling_params": params}
    if namespace is not None:
        body["extra_key"] = namespace
    start = time.perf_counter()
    resp = requests.post(f"{url}/generate", json=body, timeout=timeout)
    elapsed = time.perf_counter() - start
    if resp.status_code != 200:
        raise requests.HTTPError(f"{resp.status_code}: {resp.text}", response=resp)
    out = resp.json()
    return Result(list(out["output_ids"]), out["meta_info"], elapsed)


def new_namespace(application: str | None = None) -> str:
    """A fresh workflow namespace: ``kvcomm:`` + the workflow's secret (128 random bits, the
    frontend's own recipe), behind ``application``'s secret and a dot when it has one; the
    server refuses guessable names such as ``kvcomm:e2e``."""
    return "kvcomm:" + (f"{application}." if application else "") + secrets.token_urlsafe(16)


def template_pass(template) -> tuple[list[int], list]:
    """(input_ids, layout) of an agent's template pass: stand-in text for each placeholder."""
    ids, layout = [], []
    for i, piece in enumerate(template.text_ids):
        if i:
            name = template.placeholders[i - 1]
            standin = encode(workflow.stand_in_text(name))
            layout.append(protocol.Piece("content", len(standin), name, "standin"))
            ids += standin
        layout.append(protocol.Piece("template", len(piece)))
        ids += list(piece)
    return ids, layout


def prompt(template, contents: dict) -> tuple[list[int], list]:
    """(input_ids, layout) for an agent given {placeholder: (message id, ids)}."""
    ids, layout = list(template.text_ids[0]), [protocol.Piece("template", len(template.text_ids[0]))]
    for name, piece in zip(template.placeholders, template.text_ids[1:]):
        message, content = contents[name]
        layout += [protocol.Piece("content", len(content), name, message),
                   protocol.Piece("template", len(piece))]
        ids += list(content) + list(piece)
    return ids, layout


class Workflow:
    """One workflow namespace on a KVCOMM server: templates registered once, then questions.
    ``name`` is a label; each Workflow gets its own secret namespace, in ``application`` (its
    secret) when given: it then shares that application's templates and anchors."""

    def __init__(self, url: str, name: str, max_new_tokens: int = 32, templates=None,
                 application: str | None = None):
        self.url, self.name, self.max_new_tokens = url, name, max_new_tokens
        self.namespace = new_namespace(application)
        # the dense comparison: same prompts, no hints, in a namespace of its own
        self.plain_namespace = "plain:" + self.namespace.removeprefix("kvcomm:")
        self.templates = templates or workflow.agent_templates(render_chat, encode)
        for t in self.templates:
            self._register(t)

    def _register(self, template) -> None:
        ids, layout = template_pass(template)
        generate(self.url, ids, 1, protocol.encode(agent=template.agent, layout=layout,
                                                  template=True), self.namespace)
        # the same prompt, plain, in the comparison namespace: both trees then cache the same
        # prefixes, so a dense KVCOMM call and its comparison split prefill at the same token
        generate(self.url, ids, 1, None, self.plain_namespace)

    def run(self, qid: str, question: str, dense_url: str | None = None):
        """Agents in order; returns [(agent, Result kvcomm, Result dense | None)]."""
        base = workflow.question_base(question, encode)
        message = f"{qid}.q"
        generate(self.url, base.ids, 1, protocol.encode(base=(message, "user_question", base.drop)),
                 self.namespace)
        contents = {"user_question": (message, base.content_ids)}
        out = []
        for template in self.templates:
            ids, layout = prompt(template, contents)
            name = f"agent_{template.agent}_current"
            hints = protocol.encode(agent=template.agent, layout=layout,
                                    capture=(f"{qid}.a{template.agent}", name))
            result = generate(self.url, ids, self.max_new_tokens, hints, self.namespace)
            dense = generate(dense_url, ids, self.max_new_tokens,
                             namespace=self.plain_namespace) if dense_url else None
            out.append((template.agent, result, dense, len(ids)))
            contents[name] = (f"{qid}.a{template.agent}", result.output_ids[:-1])
        return out
