"""Triton kernels of TOVA's decode step: the current query's attention over the cache, scoring the cached slots by
it and evicting one, in place, from one pass over the keys and values.

The torch reference is `tova_attention.last_query_scores` (the scores), `TOVACache._victims` (the slot to drop:
the lowest score, ties to the highest slot) and `TOVALayer.swap_remove` (the victim slot takes the last slot); the
attention output is the model's attention function's (SDPA, flash, flex). Two entry points, the same kernels:
- `tova_attention_evict_one_triton`: the step's attention output and the eviction (TOVACache's fused route for
  attention kinds that return no weights), so scoring reads no key a second time;
- `tova_evict_one_triton`: the eviction alone, after the model's own attention ("eager", whose weights users may
  read, and the op-level baseline).
`TOVACache` dispatches here when exactly one slot per row has to go, the common decode case.

The slots are split into blocks of `SPLIT` so that every SM streams keys and values (read once, never repeated per
query head), as split-K ("flash-decoding") attention does. Three launches per layer and step, no host
synchronisation (CUDA-graph capturable):
1. `_split_logits_kernel`, one program per (row, KV head, split): the last query of the KV head's group of query
   heads against the split's keys with the module's scaling, soft-capping and mask row; stores the fp32 logits and
   the split's max and sum of exponentials per query head (and, with sink tokens, the split's lowest real
   position); with the attention output, also the split's unnormalised output exp(logits - split max) @ values.
2. `_split_scores_kernel`, one program per (row, split), all query heads at once: combines the per-split
   statistics of every head (plus the attention sinks) into the softmax denominators, writes the head-averaged
   probability of the split's slots and the split's eviction candidate (lowest key, highest slot among ties).
3. `_swap_remove_kernel`, one program per (row, KV head): with the attention output, first combines its query
   heads' split outputs (rescaled to the global max, over the denominator); then the row's victim from the split
   candidates, whose slot receives the last slot's key and value (and position). Launch 1 is the only reader of
   the values, so overwriting a slot here is safe. Padded slots score -inf and the highest of them goes first, so
   left padding stays a contiguous block on the left.

Why three launches: the scores need every head's softmax denominator over all splits, and the eviction may only
overwrite a slot once no program reads it. Without a grid-wide barrier (which needs every program resident at
once and deadlocks the interpreter) one launch can only finish a row in the program that arrives last (counted by
atomics). Measured on an H200 (B=16, 32 heads, 8 KV heads, d=64, bf16, 4,097 slots, CUDA graphs): that single
launch takes 164 us against these kernels' 68 us (one SM scores the row's fp32 logits), and two launches (scores
plus a last-arriving eviction, and the outputs combined by launch 1's last programs) 75 us: the serial tails cost
more than the launch boundaries they save.

Shapes: B rows, Hq query heads, Hkv KV heads (G = Hq / Hkv per group), n slots, d (dv) key (value) head dim, S
splits. Logits, statistics, split outputs and scores are fp32.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

SPLIT = 128  # slots per program of the scoring kernels (fewer where the key and value tiles would spill)
MAX_CHUNK = 64  # splits combined per step of a loop over the splits
MAX_TILE = 4096  # elements of a [G, splits, dv] tile of split outputs combined per step
MAX_TILE_BYTES = 64 << 10  # the key (and value) tile of a program of launch 1: larger ones spill registers on sm_90


@triton.jit
def _split_logits_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    pos_ptr,
    logits_ptr,
    max_ptr,
    sum_ptr,
    first_ptr,
    part_ptr,
    n,
    splits,
    scaling,
    softcap,
    hidden_below,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_mb,
    stride_mn,
    stride_pb,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MASK: tl.constexpr,
    SINK_TOKENS: tl.constexpr,
    UPCAST: tl.constexpr,
    OUTPUT: tl.constexpr,
):
    """MASK: 0 none, 1 boolean (True = attend), 2 additive (<= hidden_below = hidden). Hidden slots get -inf.
    logits [B, Hq, n], max/sum [B, Hq, S] fp32; first [B, S] int64: lowest position of a real slot of the split;
    OUTPUT: part [B, Hq, S, dv] fp32, the split's output relative to its max (0 where the split is all hidden)."""
    row, kv_head, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    q_heads = tl.num_programs(1) * G
    heads = kv_head * G + tl.arange(0, G_PAD)
    head_ok = heads < (kv_head + 1) * G
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    slots = split * BLOCK + tl.arange(0, BLOCK)
    valid = slots < n

    q = tl.load(
        q_ptr + row * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=head_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    k = tl.load(
        k_ptr + row * stride_kb + kv_head * stride_kh + slots[:, None] * stride_kn + dims[None, :],
        mask=valid[:, None] & dim_ok[None, :],
        other=0.0,
    )
    # fp32 products and sums as in the reference: 16-bit products are exact in the fp32 accumulator; fp32 inputs
    # use IEEE (no TF32 rounding). UPCAST also on CPU, where the interpreter's bf16 dot is wrong.
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
    tl.store(
        logits_ptr + (row * q_heads + heads)[:, None] * n + slots[None, :],
        logits,
        mask=head_ok[:, None] & valid[None, :],
    )
    split_max = tl.max(logits, axis=1)
    shift = tl.where(split_max == float("-inf"), 0.0, split_max)  # no NaN where the whole split is hidden
    weights = tl.exp(logits - shift[:, None])
    stats = (row * q_heads + heads) * splits + split
    tl.store(max_ptr + stats, split_max, mask=head_ok)
    tl.store(sum_ptr + stats, tl.sum(weights, axis=1), mask=head_ok)
    if OUTPUT:  # the values of the same slots, while the keys' split is at hand: flash-decoding's partial output
        value_dims = tl.arange(0, DV_PAD)
        value_ok = value_dims < DV
        v = tl.load(
            v_ptr + row * stride_vb + kv_head * stride_vh + slots[:, None] * stride_vn + value_dims[None, :],
            mask=valid[:, None] & value_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            part = tl.dot(weights, v.to(tl.float32), input_precision="ieee")
        else:  # weights in the values' dtype, fp32 accumulation, as flash attention does
            part = tl.dot(weights.to(v.dtype), v)
        tl.store(part_ptr + stats[:, None] * DV + value_dims[None, :], part, mask=head_ok[:, None] & value_ok[None, :])
    if SINK_TOKENS > 0:
        if kv_head == 0:
            positions = tl.load(pos_ptr + row * stride_pb + slots, mask=valid, other=0)
            first = tl.min(tl.where(hidden, 0x7FFFFFFFFFFFFFFF, positions), axis=0)
            tl.store(first_ptr + row * splits + split, first)


@triton.jit
def _split_scores_kernel(
    logits_ptr,
    max_ptr,
    sum_ptr,
    first_ptr,
    sinks_ptr,
    pos_ptr,
    scores_ptr,
    key_ptr,
    victim_ptr,
    shift_ptr,
    denominator_ptr,
    n,
    splits,
    q_heads,
    stride_pb,
    HQ_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    SINKS: tl.constexpr,
    SINK_TOKENS: tl.constexpr,
    WINDOW: tl.constexpr,
    OUTPUT: tl.constexpr,
):
    """scores [B, n] fp32 (-inf where hidden); key/victim [B, S]: the split's lowest eviction key and its highest slot;
    OUTPUT: shift/denominator [B, Hq], each head's global max and softmax denominator relative to it.
    All query heads at once (a [HQ_PAD, BLOCK] tile): the groups do not matter once the logits are written."""
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    slots = split * BLOCK + tl.arange(0, BLOCK)
    valid = slots < n
    heads = tl.arange(0, HQ_PAD)
    head_ok = heads < q_heads
    chunk = tl.arange(0, CHUNK)
    stats = (row * q_heads + heads)[:, None] * splits
    # The softmax denominator of each head: the per-split sums rescaled to the global max.
    head_max = tl.full([HQ_PAD], float("-inf"), tl.float32)
    head_sum = tl.zeros([HQ_PAD], tl.float32)
    for start in range(0, splits, CHUNK):
        ok = head_ok[:, None] & (start + chunk < splits)[None, :]
        split_max = tl.load(max_ptr + stats + start + chunk[None, :], mask=ok, other=float("-inf"))
        split_sum = tl.load(sum_ptr + stats + start + chunk[None, :], mask=ok, other=0.0)
        new_max = tl.maximum(head_max, tl.max(split_max, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        head_sum = head_sum * tl.exp(head_max - shift) + tl.sum(split_sum * tl.exp(split_max - shift[:, None]), axis=1)
        head_max = new_max
    if SINKS:  # the sink logit joins the denominator only
        sink = tl.load(sinks_ptr + heads, mask=head_ok, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(head_max, sink)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        head_sum = head_sum * tl.exp(head_max - shift) + tl.exp(sink - shift)
        head_max = new_max
    shift = tl.where(head_max == float("-inf"), 0.0, head_max)
    denominator = tl.where(head_ok, head_sum, 1.0)  # padded heads read -inf logits and add 0
    if OUTPUT:
        if split == 0:  # a row with every slot hidden and no sink attends to nothing: output 0, not NaN
            tl.store(shift_ptr + row * q_heads + heads, shift, mask=head_ok)
            tl.store(denominator_ptr + row * q_heads + heads, tl.where(head_sum > 0, head_sum, 1.0), mask=head_ok)
    logits = tl.load(
        logits_ptr + (row * q_heads + heads)[:, None] * n + slots[None, :],
        mask=head_ok[:, None] & valid[None, :],
        other=float("-inf"),
    )
    total = tl.sum(tl.exp(logits - shift[:, None]) / denominator[:, None], axis=0)
    attended = tl.max(logits, axis=0) > float("-inf")  # -inf for every head where the mask hides the slot
    scores = tl.where(attended, total / q_heads, float("-inf"))
    tl.store(scores_ptr + row * n + slots, scores, mask=valid)

    # The eviction key (as TOVACache._eviction_keys): the score, or the position (window policy), of real slots;
    # -inf for hidden ones, +inf for the sink tokens (the first SINK_TOKENS real positions).
    real = valid & attended
    key = scores
    if WINDOW:
        positions = tl.load(pos_ptr + row * stride_pb + slots, mask=valid, other=0)
        key = tl.where(real, positions.to(tl.float32), float("-inf"))
    if SINK_TOKENS > 0:
        positions = tl.load(pos_ptr + row * stride_pb + slots, mask=valid, other=0)
        first = tl.full([], 0x7FFFFFFFFFFFFFFF, tl.int64)
        for start in range(0, splits, CHUNK):
            firsts = tl.load(
                first_ptr + row * splits + start + chunk, mask=start + chunk < splits, other=0x7FFFFFFFFFFFFFFF
            )
            first = tl.minimum(first, tl.min(firsts, axis=0))
        key = tl.where(real & (positions - first < SINK_TOKENS), float("inf"), key)
    key = tl.where(valid, key, float("inf"))
    lowest = tl.min(key, axis=0)
    tl.store(key_ptr + row * splits + split, lowest)
    tl.store(victim_ptr + row * splits + split, tl.max(tl.where(valid & (key == lowest), slots, -1), axis=0))


@triton.jit
def _swap_remove_kernel(
    key_ptr,
    victim_ptr,
    pos_ptr,
    k_ptr,
    v_ptr,
    evicted_ptr,
    max_ptr,
    part_ptr,
    shift_ptr,
    denominator_ptr,
    out_ptr,
    n,
    splits,
    stride_pb,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    DK: tl.constexpr,
    DK_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    G: tl.constexpr,
    G_POW2: tl.constexpr,
    PART_CHUNK: tl.constexpr,
    OUTPUT: tl.constexpr,
):
    """Program (row, KV head): OUTPUT: out [B, 1, Hq, dv] of the KV head's query heads, in out's dtype. Then the
    row's victim (lowest key, highest slot among ties) takes the last slot."""
    row, kv_head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    if OUTPUT:  # sum over the splits of part * exp(split max - global max), over the denominator
        q_heads = tl.num_programs(1) * G
        heads = kv_head * G + tl.arange(0, G_POW2)
        head_ok = heads < (kv_head + 1) * G
        value_dims = tl.arange(0, DV_PAD)
        value_ok = value_dims < DV
        part_chunk = tl.arange(0, PART_CHUNK)
        stats = (row * q_heads + heads)[:, None] * splits  # [G, 1]
        shift = tl.load(shift_ptr + row * q_heads + heads, mask=head_ok, other=0.0)
        out = tl.zeros([G_POW2, DV_PAD], tl.float32)
        for start in range(0, splits, PART_CHUNK):
            ok = head_ok[:, None] & (start + part_chunk < splits)[None, :]  # [G, PART_CHUNK]
            split_max = tl.load(max_ptr + stats + start + part_chunk[None, :], mask=ok, other=float("-inf"))
            offsets = (stats + start + part_chunk[None, :]) * DV  # [G, PART_CHUNK]
            part = tl.load(
                part_ptr + offsets[:, :, None] + value_dims[None, None, :],
                mask=ok[:, :, None] & value_ok[None, None, :],
                other=0.0,
            )
            out += tl.sum(part * tl.exp(split_max - shift[:, None])[:, :, None], axis=1)
        out /= tl.load(denominator_ptr + row * q_heads + heads, mask=head_ok, other=1.0)[:, None]
        tl.store(
            out_ptr + row * stride_ob + heads[:, None] * stride_oh + value_dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=head_ok[:, None] & value_ok[None, :],
        )
    chunk = tl.arange(0, CHUNK)
    best = tl.full([], float("inf"), tl.float32)
    victim = tl.full([], -1, tl.int32)
    for start in range(0, splits, CHUNK):
        ok = start + chunk < splits
        keys = tl.load(key_ptr + row * splits + start + chunk, mask=ok, other=float("inf"))
        victims = tl.load(victim_ptr + row * splits + start + chunk, mask=ok, other=-1)
        lowest = tl.min(keys, axis=0)
        candidate = tl.max(tl.where(ok & (keys == lowest), victims, -1), axis=0)
        take = lowest <= best  # later splits hold higher slots: ties go to the highest
        victim = tl.where(take, candidate, victim)
        best = tl.minimum(best, lowest)
    last = n - 1
    dims = tl.arange(0, DK_PAD)
    key_head = k_ptr + row * stride_kb + kv_head * stride_kh + dims
    tl.store(key_head + victim * stride_kn, tl.load(key_head + last * stride_kn, mask=dims < DK), mask=dims < DK)
    dims = tl.arange(0, DV_PAD)
    value_head = v_ptr + row * stride_vb + kv_head * stride_vh + dims
    tl.store(value_head + victim * stride_vn, tl.load(value_head + last * stride_vn, mask=dims < DV), mask=dims < DV)
    if kv_head == 0:
        tl.store(pos_ptr + row * stride_pb + victim, tl.load(pos_ptr + row * stride_pb + last))
        tl.store(evicted_ptr + row, victim)


def _pad(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def _check_inputs(query, keys, values, positions, mask_row, sinks) -> None:
    if query.dim() != 3 or keys.dim() != 4 or values.dim() != 4:
        raise ValueError(
            f"query must be [B, Hq, d], keys and values [B, Hkv, n, d(v)]: got {query.dim()}-D, "
            f"{keys.dim()}-D and {values.dim()}-D tensors"
        )
    batch, q_heads, head_dim = query.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    if keys.shape != (batch, kv_heads, n, head_dim) or values.shape[:3] != (batch, kv_heads, n):
        raise ValueError(
            f"keys [B, Hkv, n, d] and values [B, Hkv, n, dv] must match query [B, Hq, d]: got query "
            f"{tuple(query.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}"
        )
    if q_heads % kv_heads:
        raise ValueError(f"the query heads ({q_heads}) must be a multiple of the KV heads ({kv_heads})")
    if positions.shape != (batch, n) or positions.dtype != torch.long:
        raise ValueError(
            f"positions must be int64 [B, n] = {[batch, n]}, got {positions.dtype} {tuple(positions.shape)}"
        )
    if mask_row is not None and (mask_row.dim() != 2 or mask_row.shape[-1] != n or mask_row.shape[0] not in (1, batch)):
        raise ValueError(f"mask_row must be [B or 1, n] = [{batch}, {n}], got {tuple(mask_row.shape)}")
    if sinks is not None and sinks.numel() != q_heads:
        raise ValueError(f"sinks must hold one logit per query head ({q_heads}), got {tuple(sinks.shape)}")
    if any(t.stride(-1) != 1 for t in (query, keys, values, positions)):
        raise ValueError("query, keys, values and positions must be contiguous in their last dim")


def _split_size(head_dim: int, value_dim: int, element_size: int, output: bool) -> tuple[int, int]:
    """Slots per split and warps of launch 1: its tile ([split, d] keys, and [split, dv] values for the output, in
    `element_size` bytes each) within MAX_TILE_BYTES, with 8 warps from half of it (no spills on sm_90 for
    power-of-two head dims up to 256)."""
    row_bytes = (_pad(head_dim) + (_pad(value_dim) if output else 0)) * element_size
    split = SPLIT
    while split > 16 and split * row_bytes > MAX_TILE_BYTES:
        split //= 2
    return split, 8 if 2 * split * row_bytes >= MAX_TILE_BYTES else 4


def _decode_step(query, keys, values, positions, mask_row, scaling, softcap, sinks, num_sink_tokens, window, output):
    """The three launches (see the module docstring); output: whether launches 1 and 3 also compute attention."""
    _check_inputs(query, keys, values, positions, mask_row, sinks)
    batch, q_heads, head_dim = query.shape
    kv_heads, n, value_dim = keys.shape[1], keys.shape[2], values.shape[-1]
    group = q_heads // kv_heads
    upcast = query.dtype == torch.float32 or not query.is_cuda
    block, warps = _split_size(head_dim, value_dim, 4 if upcast else query.element_size(), output)
    splits = triton.cdiv(n, block)
    device = keys.device
    logits = torch.empty(batch, q_heads, n, device=device, dtype=torch.float32)
    split_max, split_sum = torch.empty(2, batch, q_heads, splits, device=device, dtype=torch.float32)
    first = torch.empty(batch, splits, device=device, dtype=torch.long)
    split_key = torch.empty(batch, splits, device=device, dtype=torch.float32)
    split_victim = torch.empty(batch, splits, device=device, dtype=torch.int32)
    scores = torch.empty(batch, n, device=device, dtype=torch.float32)
    evicted = torch.empty(batch, device=device, dtype=torch.int32)
    if output:
        part = torch.empty(batch, q_heads, splits, value_dim, device=device, dtype=torch.float32)
        shift, denominator = torch.empty(2, batch, q_heads, device=device, dtype=torch.float32)
        out = torch.empty(batch, 1, q_heads, value_dim, device=device, dtype=query.dtype)
    else:  # unused pointers
        part = shift = denominator = out = scores
    if mask_row is None:
        mask_kind, mask_row, hidden_below = 0, scores, 0.0
    elif mask_row.dtype == torch.bool:
        mask_kind, mask_row, hidden_below = 1, mask_row.expand(batch, n).view(torch.uint8), 0.0
    else:
        mask_kind, hidden_below = 2, torch.finfo(mask_row.dtype).min / 2
        mask_row = mask_row.expand(batch, n)
    chunk = min(MAX_CHUNK, triton.next_power_of_2(splits))
    hq_pad, group_pow2, value_pad = triton.next_power_of_2(q_heads), triton.next_power_of_2(group), _pad(value_dim)
    guard = torch.cuda.device(device) if keys.is_cuda else contextlib.nullcontext()
    with guard:
        _split_logits_kernel[(batch, kv_heads, splits)](
            query,
            keys,
            values,
            mask_row,
            positions,
            logits,
            split_max,
            split_sum,
            first,
            part,
            n,
            splits,
            scaling,
            1.0 if softcap is None else softcap,
            hidden_below,
            query.stride(0),
            query.stride(1),
            keys.stride(0),
            keys.stride(1),
            keys.stride(2),
            values.stride(0),
            values.stride(1),
            values.stride(2),
            mask_row.stride(0),
            mask_row.stride(1),
            positions.stride(0),
            G=group,
            G_PAD=_pad(group),
            D=head_dim,
            D_PAD=_pad(head_dim),
            DV=value_dim,
            DV_PAD=value_pad,
            BLOCK=block,
            SOFTCAP=softcap is not None,
            MASK=mask_kind,
            SINK_TOKENS=num_sink_tokens,
            UPCAST=upcast,
            OUTPUT=output,
            num_warps=warps,
        )
        _split_scores_kernel[(batch, splits)](
            logits,
            split_max,
            split_sum,
            first,
            scores if sinks is None else sinks,
            positions,
            scores,
            split_key,
            split_victim,
            shift,
            denominator,
            n,
            splits,
            q_heads,
            positions.stride(0),
            HQ_PAD=hq_pad,
            BLOCK=block,
            CHUNK=chunk,
            SINKS=sinks is not None,
            SINK_TOKENS=num_sink_tokens,
            WINDOW=window,
            OUTPUT=output,
            num_warps=8 if hq_pad * (block + 2 * chunk) > 8192 else 4,  # the logits and two statistics tiles
        )
        _swap_remove_kernel[(batch, kv_heads)](
            split_key,
            split_victim,
            positions,
            keys,
            values,
            evicted,
            split_max,
            part,
            shift,
            denominator,
            out,
            n,
            splits,
            positions.stride(0),
            keys.stride(0),
            keys.stride(1),
            keys.stride(2),
            values.stride(0),
            values.stride(1),
            values.stride(2),
            out.stride(0),
            out.stride(-2),
            DK=head_dim,
            DK_PAD=_pad(head_dim),
            DV=value_dim,
            DV_PAD=value_pad,
            CHUNK=chunk,
            G=group,
            G_POW2=group_pow2,
            PART_CHUNK=min(chunk, max(1, MAX_TILE // (group_pow2 * value_pad))),
            OUTPUT=output,
        )
    return (out if output else None), scores, evicted


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
    or None; sinks [Hq] or None. Afterwards slots [0, n - 1) hold the kept tokens: the evicted slot holds what
    was in slot n - 1 (swap-remove), the others are untouched.
    """
    _, scores, evicted = _decode_step(
        query, keys, values, positions, mask_row, scaling, softcap, sinks, num_sink_tokens, window, output=False
    )
    return scores, evicted


def tova_attention_evict_one_triton(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention of the last query over the n slots, then `tova_evict_one_triton`'s eviction, from one read of
    the keys and values. Returns (attention output [B, 1, Hq, dv] in the query's dtype, as transformers' attention
    functions return it; scores [B, n] fp32; evicted slot [B] int32).

    Arguments as `tova_evict_one_triton`'s. The output is softmax(softcap(query @ keys^T * scaling) + mask) @ values
    per query head (GQA: query head h reads KV head h // G), with `sinks` as an extra logit of the denominator
    only (gpt-oss); hidden slots get weight 0 (and a row hiding every slot, without sinks, outputs 0).
    """
    return _decode_step(
        query, keys, values, positions, mask_row, scaling, softcap, sinks, num_sink_tokens, window, output=True
    )


@torch.library.custom_op("ttt_hf::tova_decode_step_", mutates_args=("keys", "values", "positions"))
def tova_decode_step_inplace(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    mask_row: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    num_sink_tokens: int,
    window: bool,
    output: bool,
) -> torch.Tensor:
    """The decode step as one opaque operator for `torch.compile`, whose tracer cannot follow the launch code: evicts
    one slot per row of the cache's `keys`, `values`, `positions` in place and returns the attention output
    [B, 1, Hq, dv] with `output`, else an empty tensor."""
    out, _, _ = _decode_step(
        query, keys, values, positions, mask_row, scaling, softcap, sinks, num_sink_tokens, window, output
    )
    return out if output else query.new_empty(0)


@tova_decode_step_inplace.register_fake
def _(query, keys, values, positions, mask_row, scaling, softcap, sinks, num_sink_tokens, window, output):
    return query.new_empty(query.shape[0], 1, query.shape[1], values.shape[-1]) if output else query.new_empty(0)
