"""materialize(plan, pool): write corrected, re-rotated KV into pool slots (spec §2.5 + §4.3).

Backends: ``torch`` (reference, CPU and GPU), ``triton`` (one fused all-layer launch),
``flashinfer`` (FlashInfer RoPE + deviation add + scatter), ``cpu`` (the reference's formula
without its (N, A, H, D) weight tensor: one multiply-add per anchor for content rows).
``auto`` picks triton on CUDA and cpu elsewhere.
"""

from kvcomm_sglang.kernels.plan import MaterializePlan, check_plan
from kvcomm_sglang.kernels.pool import TensorKVPool
from kvcomm_sglang.kernels.reference import capture_reference, materialize_reference

BACKENDS = ("auto", "torch", "triton", "flashinfer", "cpu")


def materialize(plan: MaterializePlan, pool, cos_sin, backend: str = "auto") -> None:
    """Run ``plan`` on ``pool`` (``k_buffer``/``v_buffer``: L x (slots, H, D)) in place."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown materialize backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        backend = "triton" if pool.k_buffer[0].is_cuda else "cpu"
    if backend == "cpu":
        from kvcomm_sglang.kernels.cpu_materialize import materialize_cpu
        return materialize_cpu(plan, pool, cos_sin)
    if backend == "torch":
        return materialize_reference(plan, pool, cos_sin)
    if backend == "triton":
        from kvcomm_sglang.kernels.triton_materialize import materialize_triton
        return materialize_triton(plan, pool, cos_sin)
    from kvcomm_sglang.kernels.flashinfer_rope import materialize_flashinfer
    return materialize_flashinfer(plan, pool, cos_sin)


__all__ = ["MaterializePlan", "TensorKVPool", "check_plan", "materialize",
           "materialize_reference", "capture_reference"]
