"""Triton kernels of TOVA's decode step: score the cached slots by the current query and evict one, in place.

The torch reference is `tova_attention.last_query_scores` (the scores), `TOVACache._kept_slots` (the slot to
drop: the lowest score, ties to the highest slot) and `TOVALayer.keep` (an order-preserving compaction);
`TOVACache.after_attention` dispatches here when exactly one slot per row has to go, the common decode case.

Two launches per layer and step, no host synchronisation:
- `_tova_scores_kernel`, one program per (row, KV head): the last query of the KV head's group of query
  heads against its keys (read once, never repeated), softmax in fp32 with the module's scaling,
  soft-capping, mask row and attention sinks; writes the group's summed probabilities per slot.
- `_tova_evict_kernel`, one program per (row, KV head, keys | values): sums the groups into the head-averaged
  score, picks the slot to evict (identically in every program of the row: no cross-program communication),
  then shifts the later slots of its KV head one to the left. Padded slots score -inf and go first, so left
  padding stays a contiguous block on the left.

Shapes: B rows, Hq query heads, Hkv KV heads (G = Hq / Hkv per group), n slots, d head dim.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

SCORE_BLOCK = 128  # slots per step of the scoring loop
SELECT_BLOCK = 512  # slots per step of the argmin loop
SHIFT_ELEMENTS = 8192  # elements per tile of the shift (slots x padded head dim)


@triton.jit
def _tova_scores_kernel(
    q_ptr, k_ptr, mask_ptr, sinks_ptr, logits_ptr, partial_ptr,
    n, scaling, softcap, hidden_below,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_mb, stride_mn,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
    SOFTCAP: tl.constexpr, MASK: tl.constexpr, SINKS: tl.constexpr, UPCAST: tl.constexpr,
):
    """MASK: 0 none, 1 boolean (True = attend), 2 additive (<= hidden_below = hidden).
    logits [B, Hq, n] fp32 is scratch; partial [B, Hkv, n] fp32 receives sum over the group of p(slot), -inf where hidden."""
    row, kv_head = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: row offsets of large batches
    kv_heads = tl.num_programs(1)
    heads = tl.arange(0, G_PAD)
    head_ok = heads < G
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    offsets = tl.arange(0, BLOCK)

    q = tl.load(
        q_ptr + row * stride_qb + (kv_head * G + heads)[:, None] * stride_qh + dims[None, :],
        mask=head_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    k_head = k_ptr + row * stride_kb + kv_head * stride_kh
    logit_rows = logits_ptr + ((row * kv_heads + kv_head) * G + heads)[:, None] * n
    row_max = tl.full([G_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([G_PAD], tl.float32)
    # Pass 1: logits exactly as attention computed them, kept in scratch; online max and sum of exponentials.
    for start in range(0, n, BLOCK):
        slots = start + offsets
        valid = slots < n
        k = tl.load(k_head + slots[:, None] * stride_kn + dims[None, :], mask=valid[:, None] & dim_ok[None, :], other=0.0)
        # fp32 products and sums as in the reference: 16-bit products are exact in the fp32 accumulator; fp32
        # inputs use IEEE (no TF32 rounding). UPCAST also on CPU, where the interpreter's bf16 dot is wrong.
        if UPCAST:
            logits = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scaling
        else:
            logits = tl.dot(q, tl.trans(k)) * scaling
        if SOFTCAP:
            logits = softcap * (2.0 * tl.sigmoid(2.0 * logits / softcap) - 1.0)  # softcap * tanh(logits / softcap)
        hidden = ~valid
        if MASK == 1:
            hidden |= tl.load(mask_ptr + row * stride_mb + slots * stride_mn, mask=valid, other=1) == 0
        if MASK == 2:
            bias = tl.load(mask_ptr + row * stride_mb + slots * stride_mn, mask=valid, other=0.0).to(tl.float32)
            logits += bias[None, :]
            hidden |= bias <= hidden_below
        logits = tl.where(hidden[None, :], float("-inf"), logits)
        tl.store(logit_rows + slots[None, :], logits, mask=head_ok[:, None] & valid[None, :])
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no NaN while every slot so far is hidden
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        row_max = new_max
    if SINKS:  # the sink logit joins the denominator only
        sink = tl.load(sinks_ptr + kv_head * G + heads, mask=head_ok, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, sink)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.exp(sink - shift)
        row_max = new_max
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    # Pass 2: probabilities summed over the group (padded heads read -inf and add 0).
    partial_row = partial_ptr + (row * kv_heads + kv_head) * n
    for start in range(0, n, BLOCK):
        slots = start + offsets
        valid = slots < n
        logits = tl.load(logit_rows + slots[None, :], mask=head_ok[:, None] & valid[None, :], other=float("-inf"))
        probs = tl.exp(logits - shift[:, None]) / row_sum[:, None]
        column = tl.where(tl.max(logits, axis=0) == float("-inf"), float("-inf"), tl.sum(probs, axis=0))
        tl.store(partial_row + slots, column, mask=valid)


@triton.jit
def _shift_left(base, stride_n, first, n, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Slots [first + 1, n) of one head move to [first, n - 1), in order (slot n - 1 becomes stale).
    One program walks upwards: a tile is read before it is overwritten, and the barrier keeps one warp's
    store from landing before another warp's load of the same slot."""
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    for start in range(first, n - 1, BLOCK):
        slots = start + tl.arange(0, BLOCK)
        ok = (slots < n - 1)[:, None] & dim_ok[None, :]
        tile = tl.load(base + (slots + 1)[:, None] * stride_n + dims[None, :], mask=ok)
        tl.debug_barrier()
        tl.store(base + slots[:, None] * stride_n + dims[None, :], tile, mask=ok)


@triton.jit
def _tova_evict_kernel(
    partial_ptr, pos_ptr, k_ptr, v_ptr, scores_ptr, evicted_ptr,
    n, q_heads, kv_heads, stride_pb,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    NUM_SINK: tl.constexpr, WINDOW: tl.constexpr,
    DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK: tl.constexpr, SHIFT_K: tl.constexpr, SHIFT_V: tl.constexpr,
):
    """Program (row, KV head, plane): plane 0 shifts the keys (and, for KV head 0, the positions), plane 1 the values."""
    row, kv_head, plane = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    first_program = (kv_head == 0) & (plane == 0)
    offsets = tl.arange(0, BLOCK)
    best = tl.full([], float("inf"), tl.float32)
    victim = tl.full([], -1, tl.int32)
    real_before = tl.zeros([], tl.int32)
    for start in range(0, n, BLOCK):
        slots = start + offsets
        valid = slots < n
        total = tl.zeros([BLOCK], tl.float32)
        for head in range(kv_heads):
            total += tl.load(partial_ptr + (row * kv_heads + head) * n + slots, mask=valid, other=0.0)
        scores = total / q_heads  # -inf stays -inf: hidden slots
        if first_program:
            tl.store(scores_ptr + row * n + slots, scores, mask=valid)
        real = valid & (scores > float("-inf"))
        key = scores
        if WINDOW:  # evict the oldest real token
            positions = tl.load(pos_ptr + row * stride_pb + slots, mask=valid, other=0).to(tl.float32)
            key = tl.where(real, positions, float("-inf"))
        if NUM_SINK > 0:  # the first NUM_SINK real slots are never evicted
            rank = tl.cumsum(real.to(tl.int32), axis=0) + real_before
            key = tl.where(real & (rank <= NUM_SINK), float("inf"), key)
            real_before += tl.sum(real.to(tl.int32), axis=0)
        key = tl.where(valid, key, float("inf"))
        block_min = tl.min(key, axis=0)
        block_victim = tl.max(tl.where(valid & (key == block_min), slots, -1), axis=0)
        take = block_min <= best  # later blocks hold higher slots: ties go to the highest
        victim = tl.where(take, block_victim, victim)
        best = tl.minimum(best, block_min)

    if first_program:
        tl.store(evicted_ptr + row, victim)
        position_row = pos_ptr + row * stride_pb
        for start in range(victim, n - 1, BLOCK):
            slots = start + offsets
            ok = slots < n - 1
            moved = tl.load(position_row + slots + 1, mask=ok)
            tl.debug_barrier()
            tl.store(position_row + slots, moved, mask=ok)
    if plane == 0:
        _shift_left(k_ptr + row * stride_kb + kv_head * stride_kh, stride_kn, victim, n, DK, DK_PAD, SHIFT_K)
    else:
        _shift_left(v_ptr + row * stride_vb + kv_head * stride_vh, stride_vn, victim, n, DV, DV_PAD, SHIFT_V)


def _pad(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def tova_evict_one_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    mask_row: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    num_sink_tokens: int = 0,
    window: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evicts one slot per row in place and returns (scores [B, n] fp32, evicted slot [B] int32).

    query [B, Hq, d]: the last query; keys [B, Hkv, n, d], values [B, Hkv, n, dv], positions [B, n] int64
    (views are fine: the last dim must be contiguous); mask_row [B, n]: boolean (True = attend) or additive,
    or None; sinks [Hq] or None. Afterwards slots [0, n - 1) hold the kept tokens in their order.
    """
    batch, q_heads, head_dim = query.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    logits = torch.empty(batch, q_heads, n, device=keys.device, dtype=torch.float32)
    partial = torch.empty(batch, kv_heads, n, device=keys.device, dtype=torch.float32)
    scores = torch.empty(batch, n, device=keys.device, dtype=torch.float32)
    evicted = torch.empty(batch, device=keys.device, dtype=torch.int32)
    if mask_row is None:
        mask_kind, mask_row, hidden_below = 0, partial, 0.0
    elif mask_row.dtype == torch.bool:
        mask_kind, mask_row, hidden_below = 1, mask_row.expand(batch, n).view(torch.uint8), 0.0
    else:
        mask_kind, hidden_below = 2, torch.finfo(mask_row.dtype).min / 2
        mask_row = mask_row.expand(batch, n)
    dk, dv = _pad(head_dim), _pad(values.shape[-1])
    guard = torch.cuda.device(keys.device) if keys.is_cuda else contextlib.nullcontext()
    with guard:
        _tova_scores_kernel[(batch, kv_heads)](
            query, keys, mask_row, partial if sinks is None else sinks, logits, partial,
            n, scaling, 1.0 if softcap is None else softcap, hidden_below,
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
            mask_row.stride(0), mask_row.stride(1),
            G=group, G_PAD=_pad(group), D=head_dim, D_PAD=dk, BLOCK=SCORE_BLOCK,
            SOFTCAP=softcap is not None, MASK=mask_kind, SINKS=sinks is not None,
            UPCAST=query.dtype == torch.float32 or not query.is_cuda,
        )
        _tova_evict_kernel[(batch, kv_heads, 2)](
            partial, positions, keys, values, scores, evicted,
            n, q_heads, kv_heads, positions.stride(0),
            keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
            NUM_SINK=num_sink_tokens, WINDOW=window, DK=head_dim, DK_PAD=dk, DV=values.shape[-1], DV_PAD=dv,
            BLOCK=SELECT_BLOCK, SHIFT_K=SHIFT_ELEMENTS // dk, SHIFT_V=SHIFT_ELEMENTS // dv,
        )
    return scores, evicted
