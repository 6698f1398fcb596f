"""KVCommConfig: the frozen, validated hyper-parameters of KVCOMM (paper §5, spec §7.1).

Defaults follow the official code (gamma 0.3, V 20, W 5, tau 1, top-p 0.9, layer 0 uncorrected).
Every knowing deviation from the official code is a switch here, with the official value
available through ``KVCommConfig.faithful()``; ``docs/fidelity.md`` lists each one and why.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

TOP_P_CREDIT_MODES = ("official", "nucleus")
DISTANCE_DTYPES = ("float32", "cache")


@dataclass(frozen=True)
class KVCommConfig:
    # ---- the paper's hyper-parameters (official defaults) ----
    gamma: float = 0.3                 # normalized-entropy gate; >= 1 disables the gate
    max_anchors: int = 20              # V: anchors per placeholder
    window: int = 5                    # W: LFU eviction looks at the W oldest anchors
    temperature: float = 1.0           # tau of both matching softmaxes
    top_p: float = 0.9                 # activation credit after a confident prediction
    min_anchors: int = 2               # fewer length-compatible anchors => dense prefill
    first_corrected_layer: int = 1     # layer 0 is never corrected
    # ---- where we knowingly differ from the official code (faithful value in comments) ----
    derotated_storage: bool = True     # official: False (deltas/embeddings in absolute frame)
    distance_dtype: str = "float32"    # official: "cache" (distances in the KV dtype)
    top_p_credit: str = "nucleus"      # official: "official" (crossing element excluded)
    strict_pool_size: bool = True      # official: False (pool holds V + 1 anchors)
    evict_on_delta_update: bool = False  # official: True (eviction check on every set_anchor)
    # ---- production bounds (no official counterpart: the official pool is unbounded) ----
    anchor_budget_bytes: int = 1 << 30  # per namespace; a server derives it from its store
    store_anchor_fraction: float = 0.75  # server: anchors of a namespace may hold this share
                                         # of the store (unless anchor_budget_bytes is given)
    store_budget_fraction: float = 0.5  # share of a server's KV pool the segment store may hold
    match_cache_bytes: int = 1 << 30   # distances and weights cached on contents, outside the
                                       # KV pool; per server (all namespaces), LRU over contents
    namespace_quota_fraction: float = 0.5  # share of the store one namespace may hold: over
                                       # it, it evicts its own state only (docs/isolation.md)
    max_namespaces: int = 1024         # live namespaces; a new one replaces only an idle one
    namespace_idle_s: float = 300.0    # a namespace unused this long may be replaced
    max_applications: int = 1024       # live applications (a namespace without one is its own);
                                       # a new one replaces only an unused, idle one
    anchor_save_interval_s: float = 60.0  # with --kvcomm-anchor-path: a changed application is
                                       # saved when the server is idle, and at least this often
    debug_invariants: bool = False     # check ownership, exactness and budgets after every
                                       # batch; violations count in /metrics (tests turn it on)
    recompute_last: int = 1            # prompt tokens recomputed in reuse mode (official: 1)
    recompute_last_piece: bool = False  # True: recompute the whole last template piece (the
                                        # generation prompt, ~15 tokens) rather than 1 token
    namespace_prefix: str = "kvcomm:"  # approximate KV only under extra_key with this prefix
    position_only: bool = False        # a measuring baseline, not KVCOMM: every call is reused
                                       # with re-rotation only (no anchors, no gate)

    def __post_init__(self) -> None:
        _require(0.0 <= self.gamma, f"gamma must be >= 0, got {self.gamma}")
        _require(self.max_anchors >= 1, f"max_anchors must be >= 1, got {self.max_anchors}")
        _require(self.window >= 1, f"window must be >= 1, got {self.window}")
        _require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _require(self.min_anchors >= 1, f"min_anchors must be >= 1, got {self.min_anchors}")
        _require(self.first_corrected_layer >= 0,
                 f"first_corrected_layer must be >= 0, got {self.first_corrected_layer}")
        _require(self.distance_dtype in DISTANCE_DTYPES,
                 f"distance_dtype must be one of {DISTANCE_DTYPES}, got {self.distance_dtype!r}")
        _require(self.top_p_credit in TOP_P_CREDIT_MODES,
                 f"top_p_credit must be one of {TOP_P_CREDIT_MODES}, got {self.top_p_credit!r}")
        _require(0.0 < self.store_anchor_fraction <= 1.0,
                 f"store_anchor_fraction must be in (0, 1], got {self.store_anchor_fraction}")
        _require(self.anchor_budget_bytes > 0,
                 f"anchor_budget_bytes must be > 0, got {self.anchor_budget_bytes}")
        _require(self.match_cache_bytes > 0,
                 f"match_cache_bytes must be > 0, got {self.match_cache_bytes}")
        _require(0.0 < self.store_budget_fraction <= 1.0,
                 f"store_budget_fraction must be in (0, 1], got {self.store_budget_fraction}")
        _require(0.0 < self.namespace_quota_fraction <= 1.0,
                 f"namespace_quota_fraction must be in (0, 1], got {self.namespace_quota_fraction}")
        _require(self.max_namespaces >= 1, f"max_namespaces must be >= 1, got {self.max_namespaces}")
        _require(self.max_applications >= 1,
                 f"max_applications must be >= 1, got {self.max_applications}")
        _require(self.anchor_save_interval_s >= 0,
                 f"anchor_save_interval_s must be >= 0, got {self.anchor_save_interval_s}")
        _require(self.namespace_idle_s >= 0,
                 f"namespace_idle_s must be >= 0, got {self.namespace_idle_s}")
        _require(self.recompute_last >= 1, f"recompute_last must be >= 1, got {self.recompute_last}")

    def recompute_count(self, last_piece_length: int) -> int:
        """Prompt tokens a reused call computes at its end: ``recompute_last``, or at least the
        whole last template piece with ``recompute_last_piece`` (the caller caps it by the
        prompt's length)."""
        if self.recompute_last_piece:
            return max(self.recompute_last, last_piece_length)
        return self.recompute_last

    @classmethod
    def faithful(cls, **overrides) -> "KVCommConfig":
        """The official code's behaviour, quirks included (for A/B parity runs)."""
        values = dict(derotated_storage=False, distance_dtype="cache", top_p_credit="official",
                      strict_pool_size=False, evict_on_delta_update=True)
        values.update(overrides)
        return cls(**values)

    @property
    def pool_capacity(self) -> int:
        """Anchors a placeholder pool holds at steady state (official: V + 1, spec §5.3)."""
        return self.max_anchors if self.strict_pool_size else self.max_anchors + 1

    @classmethod
    def from_json(cls, text: str | None) -> "KVCommConfig":
        """From a JSON object (the server reads env KVCOMM_CONFIG); {"faithful": true} starts
        from the official values."""
        if not text:
            return cls()
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"KVCOMM config is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise ValueError("KVCOMM config must be a JSON object")
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)} - {"faithful"}
        if unknown:
            raise ValueError(f"unknown KVCOMM config fields {sorted(unknown)}")
        faithful = values.pop("faithful", False)
        return cls.faithful(**values) if faithful else cls(**values)

    def replace(self, **changes) -> "KVCommConfig":
        return dataclasses.replace(self, **changes)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
