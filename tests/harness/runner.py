"""The 3-agent workflow on the real model in one of four modes (the quality benchmark's engine).

dense          every agent call prefills its whole prompt
naive          every call reuses the cached KV of every piece as computed, keys not re-rotated
position_only  every call reuses the cached KV, keys re-rotated to the new positions (no anchors)
kvcomm         KVCOMM: re-rotation + anchor offsets, dense fallback when the anchors cannot vouch

Reuse modes recompute only the last prompt token, then decode greedily. Every reused call is
also prefilled densely (same ids) to measure the KV error and the same-prompt first token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.metrics import ReuseStats, relative_error
from kvcomm_sglang.planner import Fallback, KVCommState
from tests.harness import workflow

MODES = ("dense", "naive", "position_only", "kvcomm")


@dataclass
class Call:
    question: int
    agent: int
    mode: str
    served: str                    # "dense" | "reuse"
    fallback_reason: str | None
    prompt_tokens: int
    reused_tokens: int
    answer_ids: list[int]
    first_token: int
    dense_first_token: int         # first token of a dense prefill of the same prompt
    kv_rel_error: float            # reused span, layers >= 1, vs dense prefill of the same ids


class WorkflowRunner:
    def __init__(self, hf, mode: str, config: KVCommConfig | None = None,
                 max_new_tokens: int = 32):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        self.hf, self.mode, self.max_new_tokens = hf, mode, max_new_tokens
        self.state = KVCommState(config or KVCommConfig(), hf.rope, namespace="quality")
        self.stats = ReuseStats()
        self.raw: dict[str, tuple] = {}          # naive mode: KV exactly as computed
        self.templates = workflow.agent_templates(hf.render_chat, hf.encode)
        for template in self.templates:
            self._template_pass(template)

    def _template_pass(self, template) -> None:
        """Prefill x0 s1 x1 ... with stand-in texts and keep the KV of the text pieces (spec §1.4)."""
        ids, spans = [], []
        for i, piece in enumerate(template.text_ids):
            if i:
                ids += self.hf.encode(workflow.stand_in_text(template.placeholders[i - 1]))
            spans.append((len(ids), len(ids) + len(piece)))
            ids += list(piece)
        out = self.hf.prefill(ids)
        self.state.register_template(template.agent, template.text_ids, template.placeholders,
                                     out.k, out.v, spans)
        self.raw[template.agent] = [(out.k[:, s:e], out.v[:, s:e]) for s, e in spans]

    def run_question(self, index: int, question: str) -> list[Call]:
        base = workflow.question_base(question, self.hf.encode)
        out = self.hf.prefill(base.ids)
        k, v = out.k[:, base.drop:], out.v[:, base.drop:]
        content = self.state.register_content("user_question", base.content_ids, k, v,
                                              torch.arange(base.drop, len(base.ids)))
        self.raw[content.key] = (k, v)
        keys, calls = {"user_question": content.key}, []
        for template in self.templates:
            needed = {ph: keys[ph] for ph in template.placeholders}
            call, gen = self._call(index, template.agent, needed)
            calls.append(call)
            response = self.state.register_response(f"agent_{template.agent}_current", gen.ids,
                                                    gen.k, gen.v, call.prompt_tokens)
            self.raw[response.key] = (gen.k, gen.v)
            keys[f"agent_{template.agent}_current"] = response.key
        return calls

    def _call(self, index: int, agent: str, needed: dict[str, str]):
        layout = self.state.layout(agent, needed)
        ids, n = layout.token_ids, layout.total_length
        plan = self.state.plan(agent, needed) if self.mode == "kvcomm" else None
        if self.mode == "dense" or isinstance(plan, Fallback):
            gen = self.hf.generate_dense(ids, self.max_new_tokens)
            if isinstance(plan, Fallback) and plan.learn:
                self.state.record(agent, needed, plan.learn, gen.prompt_k, gen.prompt_v)
            reason = plan.reason if plan is not None else None
            self.stats.record_call(agent, n, 0, reason or "dense_mode")
            first = int(gen.logits_first.argmax())
            return Call(index, int(agent), self.mode, "dense", reason, n, 0, gen.ids, first,
                        first, 0.0), gen
        if self.mode == "naive":
            k, v = self._naive_assembly(agent, needed)
        else:
            k, v = self.state.assemble(agent, needed, plan)
        gen = self.hf.generate_greedy((k[:, :-1], v[:, :-1]), ids[-1], self.max_new_tokens)
        ref = self.hf.prefill(ids)
        span = slice(layout.prefix_length, n - 1)
        err = relative_error(torch.cat([k[:, span], v[:, span]]),
                             torch.cat([ref.k[:, span], ref.v[:, span]]))
        reused = n - layout.prefix_length - 1
        self.stats.record_call(agent, n, reused)
        return Call(index, int(agent), self.mode, "reuse", None, n, reused, gen.ids,
                    int(gen.logits_first.argmax()), int(ref.logits_last.argmax()), err), gen

    def _naive_assembly(self, agent: str, needed: dict[str, str]):
        pieces = self.raw[agent]
        ks, vs = [pieces[0][0]], [pieces[0][1]]
        template = self.state.templates[agent]
        for i, ph in enumerate(template.placeholders, start=1):
            ck, cv = self.raw[needed[ph]]
            ks += [ck, pieces[i][0]]
            vs += [cv, pieces[i][1]]
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)
