"""Auto mode (``kvcomm-sglang serve --kvcomm-auto``): plain clients get KVCOMM with no hints.

In the launcher process, before a plain request reaches SGLang's tokenizer manager, it is made
the same KVCOMM request ``KVCommEndpoint`` would send (docs/protocol.md, "Auto mode"): its
workflow's namespace in ``extra_key``, its shared spans as a layout, its output captured as a
message (SGLang is asked for one token more than the client, which never sees it:
``auto_extra.py``, so the capture covers the whole answer); the agent's template pass is sent
first, on the request's own clock, and nothing else: new shared input is computed by the first
call that holds it, whose prefill the server keeps as its base KV. Applies to
``/v1/chat/completions``, ``/v1/completions`` and ``/generate`` with ``text``, one prompt with
one choice (``n`` = 1), no LoRA, images, input embeddings, sessions or KVCOMM hints of its own;
others are served exactly as by SGLang. Any error while preparing serves the request as it
came (logged).

Hooks (SGLang 0.5.17): ``OpenAIServingChat/Completion._convert_to_internal_request`` (AROUND:
notes the chat contents and the ``user`` field on the internal request),
``TokenizerManager.generate_request`` (AROUND: the rewrite, the internal requests, and the
message record when the output finishes); ``auto_report.py`` adds the response field.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import secrets
from dataclasses import dataclass

from kvcomm_sglang import protocol
from kvcomm_sglang.runtime_patch import auto_report
from kvcomm_sglang.runtime_patch.auto_extra import HiddenToken, ask_one_more
from kvcomm_sglang.runtime_patch.auto_spans import char_spans, token_spans
from kvcomm_sglang.runtime_patch.auto_workflows import (MIN_MESSAGE_CHARS, AutoCall,
                                                       WorkflowTable, namespace_for)

ENV = "KVCOMM_AUTO"
ANCHOR_PATH_ENV, SECRET_FILE = "KVCOMM_ANCHOR_PATH", "auto-mode.secret"
WORKFLOW_HEADER = "x-kvcomm-workflow"
OFF_HEADER = "x-kvcomm-auto"          # "off": this request is served exactly as by SGLang
MAX_WORKFLOW_ID_CHARS = 256
OPENAI = "sglang.srt.entrypoints.openai"
TARGETS = (f"{OPENAI}.serving_chat.OpenAIServingChat._convert_to_internal_request",
           f"{OPENAI}.serving_completions.OpenAIServingCompletion._convert_to_internal_request")
GENERATE = "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request"
PLAIN_ONLY = ("lora_path", "input_embeds", "image_data", "video_data", "audio_data",
              "session_params", "session_id")
logger = logging.getLogger(__name__)


@dataclass
class AutoInput:
    """What the OpenAI layer knows and the internal request does not."""

    user: str | None
    contents: tuple[str, ...] = ()        # chat message contents (system prompts excluded)


class AutoMode:
    """The launcher's auto-mode state: the secret namespaces are derived with, the workflows."""

    def __init__(self):
        self.secret = server_secret(os.environ.get(ANCHOR_PATH_ENV))
        self.workflows = WorkflowTable()


def server_secret(anchor_path: str | None) -> bytes:
    """Random per start; with ``--kvcomm-anchor-path DIR`` kept in ``DIR/auto-mode.secret``
    (created once, mode 0600), so a tenant's derived application id, and with it its saved
    anchors, survives a restart."""
    if not anchor_path:
        return secrets.token_bytes(32)
    path = pathlib.Path(anchor_path) / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    return secret


_auto: AutoMode | None = None          # made by register(), in the launcher


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def register() -> None:
    global _auto
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    _auto = AutoMode()

    for target in TARGETS:
        HookRegistry.register(target, convert_hook, HookType.AROUND)
    HookRegistry.register(GENERATE, generate_hook, HookType.AROUND)
    auto_report.register()


def convert_hook(original, serving, request, raw_request=None, *args, **kwargs):
    adapted, processed = original(serving, request, raw_request, *args, **kwargs)
    contents = tuple(_contents(getattr(request, "messages", None) or ()))
    adapted.kvcomm_auto = AutoInput(getattr(request, "user", None), contents)
    return adapted, processed


def _contents(messages):
    for message in messages:
        if getattr(message, "role", None) in ("system", "developer"):
            continue
        content = getattr(message, "content", None)
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            yield from (part.text for part in content if isinstance(getattr(part, "text", None), str))


async def generate_hook(original, manager, obj, request=None, *args, **kwargs):
    call = wf = None
    headers = getattr(request, "headers", None) or {}
    if _applies(obj) and headers.get(OFF_HEADER, "").lower() != "off":
        wf = _auto.workflows.get(workflow_namespace(obj, request))
        try:
            call = await _prepare(original, manager, obj, wf)
        except Exception:                     # never fail a plain request over its reuse
            logger.exception("kvcomm auto: serving a request as it came")
            call = None
    record = hidden = None
    if call is not None:
        record = obj.kvcomm_auto_record = auto_report.Record(call)
        hidden = _one_more(manager, obj)
    async for out in original(manager, obj, request, *args, **kwargs):
        out = _hide(hidden, out)
        if record is not None and record.observe(out, _incremental(manager, obj)):
            _remember(wf, call, record, hidden)
        yield out


def _one_more(manager, obj) -> HiddenToken | None:
    try:
        return ask_one_more(obj, manager, _incremental(manager, obj))
    except Exception:                         # the request keeps the client's own limit
        logger.exception("kvcomm auto: not asking for one token more")
        return None


def _hide(hidden: HiddenToken | None, out: dict) -> dict:
    if hidden is None:
        return out
    try:
        return hidden.hide(out)
    except Exception:                         # shows the extra token rather than fail
        logger.exception("kvcomm auto: output passed on as SGLang made it")
        return out


def workflow_namespace(obj, request) -> str:
    """The one place a request is mapped to its workflow namespace (docs/isolation.md): the
    tenant is the request's API key plus its cache salt (``extra_key``), the workflow the
    ``X-KVCOMM-Workflow`` header, else the OpenAI ``user`` field, else the tenant's default."""
    headers = getattr(request, "headers", None) or {}
    key = headers.get("authorization", "")
    salt = obj.extra_key or ""
    auto = getattr(obj, "kvcomm_auto", None)
    workflow = headers.get(WORKFLOW_HEADER) or (auto.user if auto is not None else None) or ""
    if not isinstance(workflow, str) or len(workflow) > MAX_WORKFLOW_ID_CHARS:
        raise ValueError(f"a workflow id ({WORKFLOW_HEADER} or user) is at most "
                         f"{MAX_WORKFLOW_ID_CHARS} characters")
    return namespace_for(_auto.secret, f"{key}\x00{salt}", workflow)


def _applies(obj) -> bool:
    """A single plain generation the auto mode may rewrite."""
    params = {} if obj.sampling_params is None else obj.sampling_params
    params = params if isinstance(params, dict) else None
    custom = (params or {}).get("custom_params")
    single_text = isinstance(obj.text, str) and obj.input_ids is None
    chat = getattr(obj, "kvcomm_auto", None) is not None and _flat_ids(obj.input_ids)
    return (params is not None and (single_text or chat) and params.get("n", 1) == 1
            and not (isinstance(custom, dict) and protocol.CUSTOM_PARAMS_KEY in custom)
            and not (isinstance(obj.extra_key, str)
                     and obj.extra_key.startswith(protocol.NAMESPACE_PREFIX))
            and not any(getattr(obj, name, None) for name in PLAIN_ONLY)
            and (obj.rid is None or isinstance(obj.rid, str)))


def _flat_ids(ids) -> bool:
    return isinstance(ids, list) and bool(ids) and all(type(t) is int for t in ids)


async def _prepare(original, manager, obj, wf) -> AutoCall | None:
    """Plan the call (no await: the workflow's state changes at once, so concurrent calls of
    a workflow need no lock), await its agent's template pass, then rewrite the request."""
    tokenizer = manager.tokenizer
    prompt = _text_and_offsets(tokenizer, obj)
    if prompt is None:
        return None
    text, ids, offsets = prompt
    auto = getattr(obj, "kvcomm_auto", None)
    spans = char_spans(text, wf.candidates(), auto.contents if auto else (), MIN_MESSAGE_CHARS)
    call = wf.plan(ids, token_spans(text, offsets, spans), _tokenizer_fn(tokenizer))
    if call.template_pass is not None:
        await _template_pass(original, manager, wf, call)
    obj.text, obj.input_ids, obj.extra_key = None, ids, wf.namespace
    params = obj.sampling_params or {}
    obj.sampling_params = {**params, "custom_params": {**(params.get("custom_params") or {}),
                                                       **call.hints}}
    return call


def _text_and_offsets(tokenizer, obj):
    """(text, ids, offsets) of the prompt exactly as SGLang tokenizes it, or None when the
    tokenizer cannot give character offsets that reproduce those ids."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    if obj.text is not None:
        enc = tokenizer(obj.text, return_offsets_mapping=True)
        return obj.text, list(enc["input_ids"]), enc["offset_mapping"]
    ids = list(obj.input_ids)
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    for special in (False, True):
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return text, ids, enc["offset_mapping"]
    return None


def _tokenizer_fn(tokenizer):
    return lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


async def _template_pass(original, manager, wf, call: AutoCall) -> None:
    """The agent's template pass, sent once: concurrent first calls of one agent await the
    same pass (calls of other agents and workflows wait for nothing). A failed pass is sent
    again by the agent's next call."""
    task = wf.template_sends.get(call.agent)
    if task is None:
        task = asyncio.ensure_future(_send(original, manager, *call.template_pass, wf.namespace))
        wf.template_sends[call.agent] = task
        task.add_done_callback(lambda done: _template_sent(wf, call.agent, done))
    await asyncio.shield(task)


def _template_sent(wf, agent: str, task) -> None:
    wf.template_sends.pop(agent, None)
    if not task.cancelled() and task.exception() is None:
        wf.templates_sent.add(agent)


async def _send(original, manager, ids, custom_params, namespace) -> None:
    """One internal request (a template pass): one new token, awaited."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    obj = GenerateReqInput(input_ids=list(ids), extra_key=namespace,
                           sampling_params={"max_new_tokens": 1, "temperature": 0,
                                            "custom_params": custom_params})
    async for _ in original(manager, obj, None):
        pass


def _incremental(manager, obj) -> bool:
    return bool(obj.stream and getattr(manager, "incremental_streaming_output", False))


def _remember(wf, call: AutoCall, record, hidden: HiddenToken | None) -> None:
    """The call finished: its output is a message (captured on the server: every token but
    the last generated, which is every token the client saw when the hidden one was made),
    and what the server holds or lost is noted."""
    if record.report is not None and not record.aborted:     # an aborted call stores nothing
        wf.finished(record.report.get("fallback_reason"), call)
    cut = hidden is not None and hidden.cut()
    text, ids = record.text, record.output_ids if cut else record.output_ids[:-1]
    if record.aborted or len(ids) < 1 or len(text) < MIN_MESSAGE_CHARS:
        return
    wf.add(text, ids, call.role, call.capture[1], call.agent, call.capture[0], on_server=True)
