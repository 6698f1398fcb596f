"""materialize on the CPU: the formula of ``kernels/plan.py`` without the reference's
(N, A, H, D) weight tensor per layer.

The reference (``reference.py``, the ground truth) expands every row's weights to
(N, A, H, D), clones them and multiplies elementwise, per layer. Here the rows are split once
per plan: content rows (group < 0) share one weight per (token, anchor) across heads and
channels, so their correction is, per layer and anchor, one gather of that anchor's deviation
rows and one multiply-add with a (N_c, 1, 1) weight column (no (N, A, H, D) tensor at all);
template rows (a few per piece) use their per-channel weights elementwise, as the reference
does. Rows and deviations are read with ``index_select`` and written with ``index_copy_`` (the
CPU's fast paths for whole-row gathers and scatters). Padded anchors (dev = -1) get weight 0,
as in the reference. fp32 throughout, one cast to the pool dtype; results equal the reference
up to fp32 summation order (tested on random inputs, ``tests/kernels/test_cpu_materialize.py``).
"""

from __future__ import annotations

import torch

from kvcomm_sglang.kernels.plan import MaterializePlan, check_plan
from kvcomm_sglang.rope import apply_cos_sin


def materialize_cpu(plan: MaterializePlan, pool, cos_sin: torch.Tensor) -> None:
    """Write the plan's corrected, re-rotated KV into ``pool`` (in place); see module doc."""
    check_plan(plan, pool, cos_sin)
    if plan.num_tokens == 0:
        return
    rotary_dim = cos_sin.shape[1]
    table = cos_sin.index_select(0, plan.positions)
    cos, sin = table[:, None, :rotary_dim // 2], table[:, None, rotary_dim // 2:]
    rows = _Rows(plan) if plan.num_anchors else None
    src, dst = plan.src_slots, plan.dst_slots
    for layer, (kb, vb) in enumerate(zip(pool.k_buffer, pool.v_buffer)):
        k = kb.index_select(0, src).to(torch.float32)                   # (N, H, D)
        v = vb.index_select(0, src).to(torch.float32)
        if rows is not None and layer >= plan.first_corrected_layer:
            rows.correct(k, kb, rows.token_k, plan.channel_wk, layer)
            rows.correct(v, vb, rows.token_v, plan.channel_wv, layer)
        kb.index_copy_(0, dst, apply_cos_sin(k, cos, sin, rotary_dim, plan.is_neox).to(kb.dtype))
        vb.index_copy_(0, dst, v.to(vb.dtype))


class _Rows:
    """The plan's rows split once: content rows (their deviation slots and token weights,
    masked by dev >= 0, anchor-major) and template rows (their group and mask)."""

    def __init__(self, plan: MaterializePlan):
        mask = (plan.dev_slots >= 0).to(torch.float32)                  # (N, A)
        dev = plan.dev_slots.clamp(min=0)
        is_template = plan.group >= 0
        self.content = (~is_template).nonzero().squeeze(1)
        self.template = is_template.nonzero().squeeze(1)
        self.num_anchors = plan.num_anchors
        c = self.content
        self.all_content = c.numel() == plan.num_tokens
        self.content_dev = dev.index_select(0, c).t().contiguous()      # (A, N_c)
        mask_c = mask.index_select(0, c)
        # (A, N_c, 1, 1): anchor a's weight of each content row, broadcast over (H, D)
        self.token_k = (plan.token_wk.index_select(0, c) * mask_c).t()[:, :, None, None]
        self.token_v = (plan.token_wv.index_select(0, c) * mask_c).t()[:, :, None, None]
        t = self.template
        self.template_dev = dev.index_select(0, t)                      # (N_t, A)
        self.template_group = plan.group.index_select(0, t)
        self.template_mask = mask.index_select(0, t)[:, :, None, None]  # (N_t, A, 1, 1)

    def correct(self, x: torch.Tensor, buf: torch.Tensor, token_w: torch.Tensor,
                channel_w: torch.Tensor, layer: int) -> None:
        """x (N, H, D) += sum over anchors of weight * deviation, for this layer (in place)."""
        if self.content.numel():
            corr = buf.index_select(0, self.content_dev[0]) * token_w[0]     # fp32 (N_c, H, D)
            for a in range(1, self.num_anchors):
                corr.addcmul_(buf.index_select(0, self.content_dev[a]), token_w[a])
            if self.all_content:
                x += corr
            else:
                x.index_add_(0, self.content, corr)
        if self.template.numel():
            w = channel_w[self.template_group, :, layer] * self.template_mask   # (N_t, A, H, D)
            dev = buf[self.template_dev].to(torch.float32)                      # (N_t, A, H, D)
            x.index_add_(0, self.template, (w * dev).sum(dim=1))
