"""Reuse accounting: agent-level rate (paper: share of agent calls fully served by reuse) and
token-level rate (CacheBlend: share of prompt tokens not recomputed), fallback reasons, bytes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ReuseStats:
    calls: int = 0
    reused_calls: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    by_agent: dict = field(default_factory=dict)   # agent -> [calls, reused_calls]

    def record_call(self, agent: str, prompt_tokens: int, reused_tokens: int = 0,
                    fallback_reason: str | None = None) -> None:
        if prompt_tokens < 0 or not 0 <= reused_tokens <= prompt_tokens:
            raise ValueError(f"need 0 <= reused_tokens ({reused_tokens}) <= prompt_tokens "
                             f"({prompt_tokens})")
        reused = fallback_reason is None and reused_tokens > 0
        self.calls += 1
        self.reused_calls += reused
        self.prompt_tokens += prompt_tokens
        self.reused_tokens += reused_tokens if reused else 0
        if fallback_reason is not None:
            self.fallbacks[fallback_reason.split(":")[0]] += 1
        counts = self.by_agent.setdefault(agent, [0, 0])
        counts[0] += 1
        counts[1] += reused

    @property
    def agent_reuse_rate(self) -> float:
        return self.reused_calls / self.calls if self.calls else 0.0

    @property
    def token_reuse_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "reused_calls": self.reused_calls,
                "agent_reuse_rate": self.agent_reuse_rate,
                "token_reuse_rate": self.token_reuse_rate,
                "fallbacks": dict(self.fallbacks),
                "by_agent": {a: {"calls": c, "reused": r} for a, (c, r) in self.by_agent.items()}}


def relative_error(approx, exact, from_layer: int = 1) -> float:
    """||approx - exact|| / ||exact|| over layers >= from_layer of (L, N, H, D) tensors."""
    a, e = approx[from_layer:].double(), exact[from_layer:].double()
    denom = float(e.norm())
    return float((a - e).norm()) / denom if denom else 0.0
