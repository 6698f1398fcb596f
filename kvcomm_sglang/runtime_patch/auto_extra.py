"""Auto mode: one token more than the client asked for, never shown to it.

The server captures an output's KV from its decode, which computes a token's KV only when it
feeds the next step: the last generated token has none. An answer cut at the client's
``max_tokens`` would be captured one token short, and a later prompt holding the whole answer
would not match it. As ``KVCommEndpoint`` does, auto mode asks SGLang for ``max_new_tokens + 1``
and hides the extra token, so the capture covers every token the client saw.

Hidden means the client gets what SGLang gives for its own limit: the first ``max_new_tokens``
ids, their text (decoded as the detokenizer does), logprobs and count, and the finish reason
``length``, also where an EOS or a stop string came at the limit-th token (SGLang checks the
length first). A call that stops earlier is passed on untouched. Works on SGLang's outputs as
``TokenizerManager.generate_request`` yields them: cumulative, or per chunk with
``--incremental-streaming-output``.
"""

from __future__ import annotations

# per-output-token lists of meta_info (tokenizer_manager._INCREMENTAL_STREAMING_META_INFO_KEYS)
TOKEN_KEYS = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs",
              "output_token_sampling_mask", "output_token_sampling_logprobs")
# per-token outputs ``hide`` does not trim: a request asking for them keeps its own limit
UNTRIMMED = ("return_hidden_states", "return_routed_experts")
COUNT_KEYS = ("completion_tokens", "output_token_logprobs_length",
              "output_token_sampling_mask_length")


class HiddenToken:
    """One request that was asked for ``limit + 1`` tokens; ``hide`` rewrites its outputs."""

    def __init__(self, limit: int, decode, incremental: bool):
        self.limit, self.decode, self.incremental = limit, decode, incremental
        self.ids: list[int] = []          # every id generated so far, the hidden one included
        self.sent_text = ""               # incremental: the text passed on so far

    def cut(self) -> bool:
        """The server generated the hidden token: the client's answer was cut at its limit."""
        return len(self.ids) > self.limit

    def hide(self, out: dict) -> dict:
        chunk = list(out.get("output_ids") or [])
        start = len(self.ids) if self.incremental else 0
        self.ids = self.ids + chunk if self.incremental else chunk
        keep = max(0, min(len(chunk), self.limit - start))
        meta = _trim_meta(out.get("meta_info") or {}, keep, self.limit)
        out = {**out, "output_ids": chunk[:keep], "meta_info": meta}
        finish = meta.get("finish_reason")
        stopped = isinstance(finish, dict) and finish.get("type") != "abort"
        if self.cut() or (stopped and len(self.ids) >= self.limit):
            if stopped:
                meta["finish_reason"] = {"type": "length", "length": self.limit}
            if "text" in out:
                out["text"] = self._visible_text()
        if self.incremental and isinstance(out.get("text"), str):
            self.sent_text += out["text"]
        return out

    def _visible_text(self) -> str:
        text = self.decode(self.ids[:self.limit])
        if not self.incremental:
            return text
        return text[len(self.sent_text):] if text.startswith(self.sent_text) else ""


def _trim_meta(meta: dict, keep: int, limit: int) -> dict:
    meta = dict(meta)
    for key in TOKEN_KEYS:
        if isinstance(meta.get(key), list):
            meta[key] = meta[key][:keep]
    for key in COUNT_KEYS:
        if isinstance(meta.get(key), int):
            meta[key] = min(meta[key], limit)
    return meta


def ask_one_more(obj, manager, incremental: bool) -> HiddenToken | None:
    """Raise the request's ``max_new_tokens`` by one (where it has one and the context has
    room for it) and return what hides the extra token; None leaves the request as it is."""
    params = obj.sampling_params if isinstance(obj.sampling_params, dict) else {}
    limit = params.get("max_new_tokens")
    if type(limit) is not int or limit < 1 or not isinstance(obj.input_ids, list):
        return None
    if any(getattr(obj, flag, False) for flag in UNTRIMMED):
        return None                 # per-token outputs ``hide`` does not cut: keep the limit
    reserved = getattr(manager, "num_reserved_tokens", 0) or 0
    if len(obj.input_ids) + reserved + limit + 1 > manager.context_len:
        return None
    obj.sampling_params = {**params, "max_new_tokens": limit + 1}
    return HiddenToken(limit, _decoder(manager.tokenizer, params), incremental)


def _decoder(tokenizer, params: dict):
    skip = params.get("skip_special_tokens", True)
    spaces = params.get("spaces_between_special_tokens", True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip,
                                        spaces_between_special_tokens=spaces)
