"""Auto mode, step 3: what a plain client is told about reuse.

``usage.prompt_tokens_details.cached_tokens`` already counts reused tokens (SGLang counts the
materialized tail as cached prefix, with ``--enable-cache-report``). Besides, every response of
an auto request carries ``"kvcomm": {"mode", "reused", "reused_tokens", "fallback_reason",
"template_pass", "first_computed", ...}`` (whether its agent's template pass was sent before it;
how many of its messages the server held no KV for yet, so this call computes them first): at
the top of a chat or completion response, in the first streamed chunk, and in ``/generate``'s
``meta_info`` (as ``kvcomm_auto``). Hooks (SGLang 0.5.17): AFTER ``_build_chat_response`` /
``_build_completion_response``, AROUND ``_generate_chat_stream`` /
``_generate_completion_stream``.
"""

from __future__ import annotations

import json

from kvcomm_sglang.runtime_patch.report import REPORT_KEY

OPENAI = "sglang.srt.entrypoints.openai"
FIELD = "kvcomm"
META_KEY = "kvcomm_auto"
RESPONSES = (f"{OPENAI}.serving_chat.OpenAIServingChat._build_chat_response",
             f"{OPENAI}.serving_completions.OpenAIServingCompletion._build_completion_response")
STREAMS = (f"{OPENAI}.serving_chat.OpenAIServingChat._generate_chat_stream",
           f"{OPENAI}.serving_completions.OpenAIServingCompletion._generate_completion_stream")


class Record:
    """One auto call's output as it streams: the server's report, text and ids so far."""

    def __init__(self, call):
        self.call = call
        self.report: dict | None = None
        self.text, self.output_ids, self.aborted, self.done = "", [], False, False

    def observe(self, out: dict, incremental: bool) -> bool:
        """Take one output (and tag its meta_info); True once, when the call finishes."""
        meta = out.get("meta_info") or {}
        column = meta.get(REPORT_KEY) or []
        if self.report is None and column and column[0] is not None:
            self.report = dict(column[0])
        if incremental:
            self.text += out.get("text") or ""
            self.output_ids += list(out.get("output_ids") or [])
        else:
            self.text = out.get("text") or self.text
            self.output_ids = list(out.get("output_ids") or self.output_ids)
        if self.report is not None:
            meta[META_KEY] = self.summary()
        finish = meta.get("finish_reason")
        if finish is None or self.done:
            return False
        self.done, self.aborted = True, finish.get("type") == "abort"
        return True

    def summary(self) -> dict:
        report = dict(self.report or {"mode": "dense", "reused_tokens": 0,
                                      "fallback_reason": "no_report"})
        if self.call.agent is None and report.get("mode") != "reuse":
            report["fallback_reason"] = self.call.reason or "auto:no_shared_content"
        report["reused"] = report.get("mode") == "reuse"
        report["template_pass"] = self.call.template_pass is not None
        report["first_computed"] = self.call.first_computed
        return report


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target in RESPONSES:
        HookRegistry.register(target, response_hook, HookType.AFTER)
    for target in STREAMS:
        HookRegistry.register(target, stream_hook, HookType.AROUND)


def response_hook(response, serving, request, ret, *args, **kwargs):
    """A non-streamed response: the first choice's summary as the top-level field."""
    summary = next((item["meta_info"][META_KEY] for item in ret
                    if META_KEY in (item.get("meta_info") or {})), None)
    if summary is None or not hasattr(response, "model_dump"):
        return None
    from fastapi.responses import ORJSONResponse

    return ORJSONResponse(content={**response.model_dump(mode="json", by_alias=True),
                                   FIELD: summary})


async def stream_hook(original, serving, adapted_request, *args, **kwargs):
    """A streamed response: the summary joins the first chunk once the report is there."""
    pending = True
    async for chunk in original(serving, adapted_request, *args, **kwargs):
        record = getattr(adapted_request, "kvcomm_auto_record", None)
        if pending and record is not None and record.report is not None \
                and chunk.startswith("data: {"):
            data = json.loads(chunk[len("data: "):])
            if "choices" in data:
                data[FIELD] = record.summary()
                chunk, pending = f"data: {json.dumps(data, ensure_ascii=False)}\n\n", False
        yield chunk
