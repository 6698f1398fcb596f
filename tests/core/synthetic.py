"""A synthetic multi-agent setting for planner tests: random 'unrotated' KV per token, keys
rotated to wherever a token sits, and a context-dependent deviation in layers >= 1."""

import torch

from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.planner import KVCommState
from kvcomm_sglang.rope import RopeSpec, rotate

L, H, D = 3, 2, 16
ROPE = RopeSpec.build(D, 10000.0)
TEMPLATES = {  # agent -> (text piece lengths, placeholders)
    "0": ([6, 4], ["user_question"]),
    "1": ([5, 3, 4], ["user_question", "agent_0_current"]),
    "2": ([7, 3, 2, 4], ["user_question", "agent_0_current", "agent_1_current"]),
    "d": ([4, 2, 2, 2, 3], ["user_question", "agent_0_current", "agent_1_current", "agent_2_current"]),
}


class World:
    def __init__(self, config: KVCommConfig | None = None, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.state = KVCommState(config or KVCommConfig(), ROPE, namespace="test")
        self.vocab = {}
        for agent, (lengths, names) in TEMPLATES.items():
            ids = [self.ids(n, 1000 + 100 * int(agent, 36)) for n in lengths]
            flat = [t for piece in ids for t in piece]
            k, v = self.dense(flat)
            spans, pos = [], 0
            for piece in ids:
                spans.append((pos, pos + len(piece)))
                pos += len(piece)
            self.state.register_template(agent, ids, names, k, v, spans)

    def ids(self, n, offset):
        return [offset + int(t) for t in torch.randint(0, 90, (n,), generator=self.gen)]

    def token_kv(self, t):
        if t not in self.vocab:
            g = torch.Generator().manual_seed(t)
            self.vocab[t] = (torch.randn(L, H, D, generator=g), torch.randn(L, H, D, generator=g))
        return self.vocab[t]

    def dense(self, ids, start=0):
        """'Real' KV: token KV + a deviation from the running mean of earlier tokens (layers >= 1)."""
        k0 = torch.stack([self.token_kv(t)[0] for t in ids], dim=1)
        v0 = torch.stack([self.token_kv(t)[1] for t in ids], dim=1)
        ctx_k = torch.cumsum(k0, dim=1) / torch.arange(1, len(ids) + 1)[None, :, None, None]
        ctx_v = torch.cumsum(v0, dim=1) / torch.arange(1, len(ids) + 1)[None, :, None, None]
        k, v = k0.clone(), v0.clone()
        k[1:] += 0.3 * ctx_k[1:]
        v[1:] += 0.3 * ctx_v[1:]
        return rotate(k, torch.arange(start, start + len(ids)), ROPE), v

    def content(self, placeholder, n, offset=5000):
        ids = self.ids(n, offset)
        k, v = self.dense(ids)
        return self.state.register_content(placeholder, ids, k, v, torch.arange(n))

    def dense_record(self, agent, keys, learn):
        layout = self.state.layout(agent, keys)
        k, v = self.dense(layout.token_ids)
        self.state.record(agent, keys, learn, k, v)
        return k, v
