"""KVCommEndpoint: SGLang's ``RuntimeEndpoint`` that speaks KVCOMM protocol v1 (docs/protocol.md).

Inside ``with workflow():`` each ``gen`` is sent as ``input_ids`` (template text tokenized piece
by piece, registered messages spliced as their exact ids) with KVCOMM hints, and streamed so the
client measures TTFT. Outside a workflow the endpoint behaves like ``RuntimeEndpoint``.
A message needs no request of its own: the first call whose prompt holds it is computed densely
and the server keeps that KV as the message's base when its store has room (a program argument such as the question),
an answer's comes from its own generation. A call the server answers with ``unknown_template``
(it forgot the workflow: eviction, restart) was served densely; the agent's template pass is
sent again before its next call.
``select``, ``fork`` and ``run_batch`` keep SGLang's text path (dense, exact).
"""

from __future__ import annotations

import functools
import json
import time

import requests
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.chat_template import get_chat_template

from kvcomm_sglang import protocol
from kvcomm_sglang.prompt import (STAND_IN, Segmented, Unexpressible,
                                  argument_placeholder, name_placeholders, segment, shape_key)
from kvcomm_sglang.frontend.scope import CallRecord, Workflow, current_workflow

SERVE_FIX = ("start it with `kvcomm-sglang serve --device cpu` (or `python -m sglang.launch_server "
             "... --radix-cache-backend kvcomm` with SGLANG_PLUGINS=kvcomm)")
QUESTION_ARGS = ("question", "user_question", "query", "task", "q")
PLAIN_ONLY = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")


class KVCommEndpoint(RuntimeEndpoint):
    def __init__(self, base_url: str, api_key=None, verify=None, chat_template_name=None,
                 timeout: float = 600):
        base_url = base_url.rstrip("/")
        try:
            super().__init__(base_url, api_key, verify, chat_template_name)
        except (requests.ConnectionError, OSError):     # http_request raises urllib's URLError
            raise ConnectionError(f"no SGLang server answers at {base_url}; {SERVE_FIX}") from None
        self.support_concate_and_append = False     # /concate_and_append_request is gone
        self.timeout = timeout
        self._tokenizer = _load_tokenizer(self.model_info["model_path"])
        if chat_template_name is None and "<|im_start|>" in str(
                getattr(self._tokenizer, "chat_template", "") or ""):
            self.chat_template = get_chat_template("chatml")
        self._checked_backend = False

    # ---- SGLang backend interface ----
    def generate(self, s, sampling_params):
        wf = current_workflow()
        if wf is None or any(getattr(sampling_params, k, None) is not None for k in PLAIN_ONLY):
            return super().generate(s, sampling_params)
        self._handle_dtype_to_regex(sampling_params)
        params = {"skip_special_tokens": True, "spaces_between_special_tokens": True,
                  **sampling_params.to_srt_kwargs()}
        with wf.lock:
            call = self._prepare(wf, s.text_, s.arguments)
        return self._generate_call(wf, call, params)

    # ---- tokenization ----
    @functools.lru_cache(maxsize=4096)
    def tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---- one call: layout, template pass ----
    def _prepare(self, wf: Workflow, text: str, arguments: dict) -> dict:
        if wf.mode == "kvcomm":
            self._check_backend()
        self._add_arguments(wf, arguments or {}, text)
        found = segment(text, wf.candidates(), wf.min_message_chars)
        role = wf.role_of(found.prefix)
        ids = self._assemble(found)
        call = {"role": role, "ids": ids, "agent": f"{role}", "layout": None, "reason": None}
        try:
            names = name_placeholders(found, role)
        except Unexpressible as exc:
            call["reason"] = f"client:{exc}"
            return call
        if not found.messages:
            return call
        agent = wf.agent_id(role, shape_key(found, names))
        if agent is None:
            call["reason"] = "client:too_many_prompt_shapes"
            return call
        call["agent"], call["layout"] = agent, _layout(found, names, self.tokenize)
        if wf.mode == "kvcomm":
            if wf.needs_template(agent, (tuple(found.texts), tuple(names))):
                self._template_pass(wf, agent, found, names)
        return call

    def _add_arguments(self, wf: Workflow, arguments: dict, text: str) -> None:
        """Program keyword arguments named in ``wf.shared_args`` that appear in the prompt are
        shared messages: a question-like name is the user question, others conditions."""
        for name, value in arguments.items():
            if name in wf.shared_args and isinstance(value, str) and \
                    len(value) >= wf.min_message_chars and value in text:
                wf.argument_message(value, argument_placeholder(name, name in QUESTION_ARGS),
                                    self.tokenize)

    def _assemble(self, found: Segmented) -> list[int]:
        ids = list(self.tokenize(found.texts[0]))
        for message, piece in zip(found.messages, found.texts[1:]):
            ids += list(message.ids) + list(self.tokenize(piece))
        return ids

    def _template_pass(self, wf, agent: str, found: Segmented, names) -> None:
        ids, layout = list(self.tokenize(found.texts[0])), [protocol.Piece("template",
                                                                          len(self.tokenize(found.texts[0])))]
        for name, piece in zip(names, found.texts[1:]):
            stand_in = self.tokenize(STAND_IN.format(name))
            layout += [protocol.Piece("content", len(stand_in), name, "standin"),
                       protocol.Piece("template", len(self.tokenize(piece)))]
            ids += list(stand_in) + list(self.tokenize(piece))
        hints = protocol.encode(agent=agent, layout=layout, template=True)
        self._post(ids, {"max_new_tokens": 1, "temperature": 0}, hints, wf.namespace)
        wf.sent_template(agent)

    # ---- the gen request itself ----
    def _generate_call(self, wf: Workflow, call: dict, params: dict):
        max_new = params.get("max_new_tokens")
        if max_new is not None:     # one token more: output_ids[:-1] (the message) = the answer
            params["max_new_tokens"] = max_new + 1
        capture_id = f"m{wf.next_seq()}"
        hints = None
        if wf.mode == "kvcomm":
            hints = protocol.encode(agent=call["agent"] if call["layout"] else None,
                                    layout=call["layout"] or [],
                                    capture=(capture_id, f"agent_{call['role']}_current"))
        ttft, text, out_ids, meta = self._post(call["ids"], params, hints, wf.namespace,
                                               stream=True)
        text, ids = self._trim(text, out_ids, meta, max_new)
        message = None
        if ids is not None and len(text) >= wf.min_message_chars:
            message = wf.add_message(text, ids, call["role"], f"agent_{call['role']}_current",
                                     message_id=capture_id, agent=call["agent"])
        record = _record(call, ttft, meta, wf.mode, text, message)
        if call["layout"]:
            wf.forget(record.fallback_reason, call["agent"])
        with wf.lock:
            wf.calls.append(record)
        meta["kvcomm_call"] = record.__dict__.copy()
        return text, meta

    def _trim(self, text: str, out_ids: list, meta: dict, max_new):
        """-> (answer text, its message ids or None). A length-stopped answer drops the extra
        token; any answer whose ids[:-1] do not decode to its text is not a message."""
        finish = (meta.get("finish_reason") or {}).get("type")
        if finish == "length" and max_new is not None and len(out_ids) == max_new + 1:
            head = self.decode(out_ids[:-1])
            return (head, out_ids[:-1]) if text.startswith(head) else (text, None)
        if len(out_ids) >= 2 and self.decode(out_ids[:-1]) == text:
            return text, out_ids[:-1]
        return text, None

    # ---- HTTP ----
    def _post(self, ids, params, hints, namespace, stream=False):
        params = dict(params)
        if hints is not None:
            params["custom_params"] = hints
        body = {"input_ids": list(ids), "sampling_params": params, "stream": stream}
        if namespace is not None and hints is not None:
            body["extra_key"] = namespace
        start = time.perf_counter()
        try:
            resp = requests.post(f"{self.base_url}/generate", json=body, stream=stream,
                                 timeout=self.timeout, headers=self._headers())
        except requests.ConnectionError:
            raise ConnectionError(f"the SGLang server at {self.base_url} is not reachable") from None
        with resp:
            if resp.status_code != 200:
                raise RuntimeError(f"{self.base_url}/generate answered {resp.status_code}: "
                                   f"{resp.text}")
            if not stream:
                out = resp.json()
                return time.perf_counter() - start, out["text"], out["output_ids"], out["meta_info"]
            ttft, last = None, None
            for line in resp.iter_lines():
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                ttft = ttft if ttft is not None else time.perf_counter() - start
                last = json.loads(line[5:])
        if last is None:
            raise RuntimeError(f"{self.base_url}/generate streamed no output")
        return ttft, last["text"], list(last["output_ids"]), last["meta_info"]

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _check_backend(self) -> None:
        if self._checked_backend:
            return
        info = self.get_server_info()
        backend = info.get("radix_cache_backend")
        if backend != "kvcomm":
            raise RuntimeError(
                f"the SGLang server at {self.base_url} does not run the kvcomm radix-cache "
                f"backend (radix_cache_backend={backend!r}); {SERVE_FIX}")
        self._checked_backend = True


def _layout(found: Segmented, names, tokenize) -> list[protocol.Piece]:
    layout = [protocol.Piece("template", len(tokenize(found.texts[0])))]
    for message, name, piece in zip(found.messages, names, found.texts[1:]):
        layout += [protocol.Piece("content", len(message.ids), name, message.id),
                   protocol.Piece("template", len(tokenize(piece)))]
    return layout


def _record(call: dict, ttft: float, meta: dict, mode: str, text: str, message) -> CallRecord:
    report = (meta.get("kvcomm") or [None])[0] if mode == "kvcomm" else None
    if mode == "dense":
        kind, reused, reason = "dense", 0, None
    elif report is None:
        kind, reused, reason = "dense", 0, call["reason"] or "no_report"
    else:
        kind, reused = report.get("mode", "dense"), int(report.get("reused_tokens") or 0)
        reason = report.get("fallback_reason") or call["reason"]
    return CallRecord(call["role"], call["agent"], ttft, kind, reused, len(call["ids"]), reason,
                      text, message.id if message else None)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)
