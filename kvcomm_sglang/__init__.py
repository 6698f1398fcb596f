"""kvcomm-sglang: KVCOMM cross-context KV reuse (arXiv 2510.12872) for SGLang.

The core (this package's top-level modules) is pure torch and never imports SGLang.

Shape alphabet, used in every docstring of a tensor function:

    N  tokens                 L  layers            H  KV heads (per TP rank)
    D  head dim               R  rotary dim (<= D) A  anchors
    S  segments / pieces      G  template-piece weight groups

Segment KV is held token-major per layer, ``k, v: (L, N, H, D)``, which matches SGLang's
per-layer pool buffers ``k_buffer[l]: (slots, H, D)``.
"""

from kvcomm_sglang.config import KVCommConfig

__all__ = ["KVCommConfig"]
__version__ = "0.1.0"
