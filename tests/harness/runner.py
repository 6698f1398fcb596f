"""The 3-agent workflow on the real model in one of four modes (the quality benchmark's engine).

dense          every agent call prefills its whole prompt
naive          every call reuses the cached KV of every piece as computed, keys not re-rotated
position_only  every call reuses the cached KV, keys re-rotated to the new positions (no anchors)
kvcomm         KVCOMM: re-rotation + anchor offsets, dense fallback when the anchors cannot vouch

Reuse modes recompute the last prompt token (the config's ``recompute_last`` tokens, or the
whole last template piece with ``recompute_last_piece``, as the server does), then decode
greedily; ``sink`` recomputes the first tokens of every reused piece and ``selective`` the
tokens with the largest estimated offset (oracle-only options, tests/harness/recompute.py).
Every reused call is also prefilled densely (same ids) to measure the KV error and the
same-prompt first token. With a ``reference`` (the dense run's generations), every call's prompt
holds the dense answers before it and the messages are registered from them: each mode answers
the very prompts dense answered (same calls, no cascade). ``ablation`` zeroes one part of the
anchor correction in every plan (``ABLATIONS``); ``judge`` adds the judge agent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.metrics import ReuseStats, relative_error
from kvcomm_sglang.planner import Fallback, KVCommState
from tests.harness import workflow
from tests.harness.recompute import largest_offsets, refresh, sink_positions

MODES = ("dense", "naive", "position_only", "kvcomm")
ABLATIONS = ("no_value_correction", "no_key_correction", "no_template_correction",
             "no_content_correction")


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
    dense_answer_ids: list[int] | None = None   # with a reference: dense's answer, same prompt
    kv_error_kv: tuple = (0.0, 0.0)  # the same error of K alone and of V alone


class WorkflowRunner:
    def __init__(self, hf, mode: str, config: KVCommConfig | None = None,
                 max_new_tokens: int = 32, judge: bool = False, ablation: str | None = None,
                 sink: int = 0, selective: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        if ablation is not None and ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; choose from {ABLATIONS}")
        if sink < 0 or selective < 0:
            raise ValueError(f"sink ({sink}) and selective ({selective}) must be >= 0")
        self.hf, self.mode, self.max_new_tokens = hf, mode, max_new_tokens
        self.ablation, self.sink, self.selective = ablation, sink, selective
        self.generations: dict[tuple[int, int], object] = {}   # (question, agent) -> Generation
        self.state = KVCommState(config or KVCommConfig(), hf.rope, namespace="quality")
        self.stats = ReuseStats()
        self.raw: dict[str, tuple] = {}          # naive mode: KV exactly as computed
        self.templates = workflow.agent_templates(hf.render_chat, hf.encode, judge=judge)
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

    def run_question(self, index: int, question: str, reference: dict | None = None) -> list[Call]:
        """All agents on one question; ``reference`` ((question, agent) -> dense Generation):
        messages are dense's answers, and each call also keeps dense's answer to compare."""
        base = workflow.question_base(question, self.hf.encode)
        out = self.hf.prefill(base.ids)
        k, v = out.k[:, base.drop:], out.v[:, base.drop:]
        content = self.state.register_content("user_question", base.content_ids, k, v,
                                              torch.arange(base.drop, len(base.ids)))
        self.raw[content.key] = (k, v)
        keys, calls = {"user_question": content.key}, []
        self.last_keys = keys                # the question's contents (tests read the layouts)
        for template in self.templates:
            needed = {ph: keys[ph] for ph in template.placeholders}
            call, gen = self._call(index, template.agent, needed)
            calls.append(call)
            if self.mode == "dense":     # the reference of later modes (no prompt KV kept)
                self.generations[(index, call.agent)] = dataclasses.replace(
                    gen, prompt_k=None, prompt_v=None)
            if reference is not None:
                gen = reference[(index, call.agent)]
                call.dense_answer_ids = gen.ids
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
            k, v = self.state.assemble(agent, needed, ablate(plan, self.ablation))
        recompute = self._recompute_count(layout)
        k, v, extra = self._refresh(layout, plan, needed, agent, (k, v), n - recompute)
        gen = self._generate(ids, k, v, recompute)
        ref = self.hf.prefill(ids)
        span = slice(layout.prefix_length, n - 1)
        err = [relative_error(torch.cat(a), torch.cat(b)) for a, b in (
            ((k[:, span], v[:, span]), (ref.k[:, span], ref.v[:, span])),
            ((k[:, span],), (ref.k[:, span],)), ((v[:, span],), (ref.v[:, span],)))]
        reused = n - layout.prefix_length - recompute - extra
        self.stats.record_call(agent, n, reused)
        return Call(index, int(agent), self.mode, "reuse", None, n, reused, gen.ids,
                    int(gen.logits_first.argmax()), int(ref.logits_last.argmax()), err[0],
                    kv_error_kv=(err[1], err[2])), gen

    def _recompute_count(self, layout) -> int:
        """Prompt tokens computed at the end, as the server counts them (``Runtime.decide``)."""
        count = self.state.config.recompute_count(layout.pieces[-1].length)
        return min(count, layout.total_length - 1)

    def _refresh(self, layout, plan, needed, agent, kv, end: int):
        """The sink and selective options: -> k, v with the chosen tokens below ``end``
        recomputed, and how many were."""
        chosen = set(sink_positions(layout, self.sink, end)) if self.sink else set()
        if self.selective:
            plain = self.state.assemble(agent, needed, None)
            chosen |= set(largest_offsets(kv, plain, layout.prefix_length, end, self.selective))
        if not chosen:
            return (*kv, 0)
        return (*refresh(self.hf, layout.token_ids, *kv, chosen), len(chosen))

    def _generate(self, ids, k, v, recompute: int):
        """Greedy answer from the assembled KV, the last ``recompute`` prompt tokens computed."""
        r = min(recompute, len(ids) - 1)
        past = (k[:, :len(ids) - r], v[:, :len(ids) - r])
        if r > 1:
            head = self.hf.prefill(ids[len(ids) - r:-1], past, len(ids) - r)
            past = (torch.cat([past[0], head.k], 1), torch.cat([past[1], head.v], 1))
        return self.hf.generate_greedy(past, ids[-1], self.max_new_tokens)

    def _naive_assembly(self, agent: str, needed: dict[str, str]):
        pieces = self.raw[agent]
        ks, vs = [pieces[0][0]], [pieces[0][1]]
        template = self.state.templates[agent]
        for i, ph in enumerate(template.placeholders, start=1):
            ck, cv = self.raw[needed[ph]]
            ks += [ck, pieces[i][0]]
            vs += [cv, pieces[i][1]]
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)


def ablate(plan, ablation: str | None):
    """The plan with one part of the anchor correction zeroed (new weight tensors: the cached
    weights the plan points at stay intact)."""
    if ablation is None or plan is None:
        return plan
    pieces = []
    for piece in plan.pieces:
        off_k = ablation == "no_key_correction" or (ablation == "no_template_correction"
                                                    and piece.kind == "template") or \
            (ablation == "no_content_correction" and piece.kind == "content")
        off_v = ablation == "no_value_correction" or (ablation == "no_template_correction"
                                                      and piece.kind == "template") or \
            (ablation == "no_content_correction" and piece.kind == "content")
        wk = torch.zeros_like(piece.weights_k) if off_k and piece.anchors else piece.weights_k
        wv = torch.zeros_like(piece.weights_v) if off_v and piece.anchors else piece.weights_v
        pieces.append(dataclasses.replace(piece, weights_k=wk, weights_v=wv, packed=None))
    return dataclasses.replace(plan, pieces=pieces)
