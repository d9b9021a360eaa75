"""Triton kernels of the causal depthwise convolutions around the TTT layer (the Mamba backbone's pre-conv, the
shared q/k projection's two): over whole sequences, forward and backward, channels last; and the decode step,
which moves the window in place.

`ttt_ops.causal_conv1d` is the numerical definition: y[t] = bias + sum_j w[:, j] * [state, x][t + j] for
x [B, T, C], the previous K-1 inputs `state` [B, K-1, C] and weights [C, 1, K]. The torch path runs
`F.conv1d` on a transposed copy of [state, x] and transposes its output back; these kernels read x and write y
in their own layout, and one launch serves both filter banks of the shared q/k projection, reading x once.
Products and sums in fp32; y and the input gradients in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ttt_triton_common import _on_triton_device, _owns_memory

BLOCK_T = 32  # tokens per tile
BLOCK_C = 128  # channels per program
BACKWARD_ROWS = 128  # tokens per backward program: one partial sum of the weights' gradient each
CONV_BLOCK = 256  # channels per program of the decode step


@triton.jit
def _shifted_input(x_ptr, state_ptr, row, t, c, c_ok, T, C, SHIFT: tl.constexpr, K: tl.constexpr):
    """[state, x][t + SHIFT] for tokens t, as a [BLOCK_T, BLOCK_C] fp32 tile: x at s = t + SHIFT - (K-1) >= 0,
    the state before."""
    s = t + (SHIFT - (K - 1))
    from_x = (s >= 0) & (s < T)
    tile = tl.load(x_ptr + (row * T + s)[:, None] * C + c[None, :], mask=from_x[:, None] & c_ok[None, :], other=0.0)
    tile = tile.to(tl.float32)
    if K > 1:
        from_state = (s < 0) & (t < T)
        tile += tl.load(
            state_ptr + (row * (K - 1) + (K - 1) + s)[:, None] * C + c[None, :],
            mask=from_state[:, None] & c_ok[None, :],
            other=0.0,
        ).to(tl.float32)
    return tile


@triton.jit
def _causal_conv_fwd_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    y_2_ptr,
    T,
    C,
    K: tl.constexpr,
    BANKS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (row, tile of tokens, block of channels): y (and y_2 when BANKS == 2) of the tile.
    x [B, T, C], state [B, K-1, C] contiguous; w [banks, C, K], b [banks, C]."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    acc_2 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        tile = _shifted_input(x_ptr, state_ptr, row, t, c, c_ok, T, C, j, K)
        acc += tile * tl.load(w_ptr + c * K + j, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if BANKS == 2:
            acc_2 += tile * tl.load(w_ptr + (C + c) * K + j, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if BANKS == 2:
            acc_2 += tl.load(b_ptr + C + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    offsets = (row * T + t)[:, None] * C + c[None, :]
    ok = (t < T)[:, None] & c_ok[None, :]
    tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=ok)
    if BANKS == 2:
        tl.store(y_2_ptr + offsets, acc_2.to(y_2_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _causal_conv_bwd_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    dy_ptr,
    dy_2_ptr,
    dx_ptr,
    dw_ptr,
    db_ptr,
    T,
    C,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BANKS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (row, ROWS tokens, block of channels): dx[t] = sum_banks sum_j w[:, j] dy[t + K-1-j] over its
    tokens, and its partial sums of dw[bank, j] = sum_t dy[t] [state, x][t + j] and db = sum_t dy[t], written
    to slot (row, tile) of dw [P, banks, K, C] and db [P, banks, C] (fp32; summed by the caller)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    dw = tl.zeros((K_PAD, BLOCK_C), dtype=tl.float32)
    dw_2 = tl.zeros((K_PAD, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db_2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    taps = tl.arange(0, K_PAD)
    for tile_start in tl.range(0, ROWS, BLOCK_T):
        t = tl.program_id(1) * ROWS + tile_start + tl.arange(0, BLOCK_T)
        dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for j in tl.static_range(K):
            u = t + (K - 1 - j)
            offsets = (row * T + u)[:, None] * C + c[None, :]
            ok = (u < T)[:, None] & c_ok[None, :]
            dy = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            dx += dy * tl.load(w_ptr + c * K + j, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            if BANKS == 2:
                dy_2 = tl.load(dy_2_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
                dx += dy_2 * tl.load(w_ptr + (C + c) * K + j, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            if j == K - 1:  # u == t: this tile's own output gradients
                for i in tl.static_range(K):
                    tile = _shifted_input(x_ptr, state_ptr, row, t, c, c_ok, T, C, i, K)
                    dw += tl.where(taps[:, None] == i, tl.sum(dy * tile, axis=0)[None, :], 0.0)
                    if BANKS == 2:
                        dw_2 += tl.where(taps[:, None] == i, tl.sum(dy_2 * tile, axis=0)[None, :], 0.0)
                db += tl.sum(dy, axis=0)
                if BANKS == 2:
                    db_2 += tl.sum(dy_2, axis=0)
        ok = (t < T)[:, None] & c_ok[None, :]
        tl.store(dx_ptr + (row * T + t)[:, None] * C + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
    slot = row * tl.num_programs(1) + tl.program_id(1)
    dw_offsets = (slot * BANKS * K + taps)[:, None] * C + c[None, :]
    dw_ok = (taps < K)[:, None] & c_ok[None, :]
    tl.store(dw_ptr + dw_offsets, dw, mask=dw_ok)
    tl.store(db_ptr + slot * BANKS * C + c, db, mask=c_ok)
    if BANKS == 2:
        tl.store(dw_ptr + dw_offsets + K * C, dw_2, mask=dw_ok)
        tl.store(db_ptr + (slot * BANKS + 1) * C + c, db_2, mask=c_ok)


class CausalConvChunk(torch.autograd.Function):
    """Outputs of one or two filter banks over the same x; saves x, the state and the weights."""

    @staticmethod
    def forward(ctx, x, state, weight, bias):  # weight [banks, C, K], bias [banks, C] or None
        batch, tokens, channels = x.shape
        banks, _, width = weight.shape
        ys = [torch.empty_like(x) for _ in range(banks)]
        grid = (batch, triton.cdiv(tokens, BLOCK_T), triton.cdiv(channels, BLOCK_C))
        _causal_conv_fwd_kernel[grid](
            x,
            state,
            weight,
            bias if bias is not None else weight,
            ys[0],
            ys[-1],
            tokens,
            channels,
            K=width,
            BANKS=banks,
            HAS_BIAS=bias is not None,
            BLOCK_T=BLOCK_T,
            BLOCK_C=BLOCK_C,
            num_warps=4,
        )
        ctx.save_for_backward(x, state, weight)
        ctx.has_bias = bias is not None
        return tuple(ys)

    @staticmethod
    def backward(ctx, *d_ys):
        x, state, weight = ctx.saved_tensors
        batch, tokens, channels = x.shape
        banks, _, width = weight.shape
        d_ys = [d.contiguous() for d in d_ys]
        tiles = triton.cdiv(tokens, BACKWARD_ROWS)
        d_x = torch.empty_like(x)
        d_w = torch.empty(batch * tiles, banks, width, channels, dtype=torch.float32, device=x.device)
        d_b = torch.empty(batch * tiles, banks, channels, dtype=torch.float32, device=x.device)
        _causal_conv_bwd_kernel[(batch, tiles, triton.cdiv(channels, BLOCK_C))](
            x,
            state,
            weight,
            d_ys[0],
            d_ys[-1],
            d_x,
            d_w,
            d_b,
            tokens,
            channels,
            K=width,
            K_PAD=triton.next_power_of_2(width),
            BANKS=banks,
            ROWS=BACKWARD_ROWS,
            BLOCK_T=BLOCK_T,
            BLOCK_C=BLOCK_C,
            num_warps=4,
        )
        d_state = None
        if ctx.needs_input_grad[1]:
            # The state's K-1 inputs reach only the first K-1 outputs: [state, x][p] gets w[j] dy[p - j].
            d_state = torch.zeros(state.shape, dtype=torch.float32, device=x.device)
            for w, d_y in zip(weight.float(), d_ys):
                for p in range(width - 1):
                    for j in range(max(0, p + 1 - tokens), p + 1):
                        d_state[:, p] += w[:, j] * d_y[:, p - j].float()
            d_state = d_state.to(state.dtype)
        d_weight = d_w.sum(0).transpose(1, 2).to(weight.dtype)
        d_bias = d_b.sum(0).to(weight.dtype) if ctx.has_bias else None
        return d_x, d_state, d_weight, d_bias


def _check_filter_banks(
    name: str, x: torch.Tensor, filters: list[tuple[torch.Tensor, torch.Tensor | None]], state: torch.Tensor
) -> int:
    """Raise unless `filters` are one or two banks (weight [C, 1, K], bias [C] or None; all with a bias or none)
    over x [B, T, C] with a state [B, K-1, C]; returns K."""
    batch, _, channels = x.shape
    width = filters[0][0].shape[-1]
    if len(filters) not in (1, 2) or state.shape != (batch, width - 1, channels):
        raise ValueError(
            f"{name} takes one or two filter banks of one width K and a state [B, K-1, C]; got {len(filters)} banks "
            f"of width {width}, x {tuple(x.shape)}, state {tuple(state.shape)}"
        )
    for weight, bias in filters:
        if weight.shape != (channels, 1, width) or (bias is not None and bias.shape != (channels,)):
            raise ValueError(
                f"every filter bank must be weight [C, 1, K] = [{channels}, 1, {width}] and bias [C] or None; got "
                f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}"
            )
    if len({b is None for _, b in filters}) > 1:
        raise ValueError("the filter banks must all have a bias or none")
    return width


def causal_conv_chunk_triton(
    x: torch.Tensor, filters: list[tuple[torch.Tensor, torch.Tensor | None]], state: torch.Tensor
) -> list[torch.Tensor]:
    """`ttt_ops.causal_conv1d`'s outputs for one or two filter banks over the same input, differentiable in
    everything: x [B, T, C] (fp32, bf16 or fp16), filters [(weight [C, 1, K], bias [C] or None)] (all with a
    bias or none), state [B, K-1, C] (taken in x's dtype). Returns the outputs [B, T, C] in x's dtype."""
    if not _on_triton_device(x):
        raise RuntimeError(
            "causal_conv_chunk_triton on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "triton"
        )
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"causal_conv_chunk_triton takes fp32, bf16 or fp16 inputs, got {x.dtype}")
    _check_filter_banks("causal_conv_chunk_triton", x, filters, state)
    weight = torch.stack([w[:, 0] for w, _ in filters])  # [banks, C, K]
    bias = torch.stack([b for _, b in filters]) if filters[0][1] is not None else None
    state = state.to(device=x.device, dtype=x.dtype).contiguous()
    return list(CausalConvChunk.apply(x.contiguous(), state, weight, bias))


@triton.jit
def _causal_conv_step_kernel(
    x_ptr,
    state_ptr,
    length_ptr,
    weight_ptr,
    bias_ptr,
    weight_2_ptr,
    bias_2_ptr,
    y_ptr,
    y_2_ptr,
    C,
    stride_xb,
    stride_sb,
    stride_sk,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TWO: tl.constexpr,
):
    """Program (row, block of channels): y = sum_k w[:, k] [state, x][k] + bias for one or (TWO) two filter
    banks over the same input, then the window moves by one token in place (rows with length 0 keep it).
    x [B, C]; state [B, K-1, C]; weights [C, K] contiguous; y [B, C] in x's dtype; products and sums in fp32."""
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    channels = block * BLOCK + tl.arange(0, BLOCK)
    ok = channels < C
    x = tl.load(x_ptr + row * stride_xb + channels, mask=ok, other=0.0).to(tl.float32)
    acc = x * tl.load(weight_ptr + channels * K + K - 1, mask=ok, other=0.0).to(tl.float32)
    acc_2 = acc
    if TWO:
        acc_2 = x * tl.load(weight_2_ptr + channels * K + K - 1, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + channels, mask=ok, other=0.0).to(tl.float32)
        if TWO:
            acc_2 += tl.load(bias_2_ptr + channels, mask=ok, other=0.0).to(tl.float32)
    moves = tl.load(length_ptr + row) > 0
    window = state_ptr + row * stride_sb + channels
    previous = tl.load(window, mask=ok, other=0.0)
    for k in tl.static_range(K - 1):
        acc += previous.to(tl.float32) * tl.load(weight_ptr + channels * K + k, mask=ok, other=0.0).to(tl.float32)
        if TWO:
            acc_2 += previous.to(tl.float32) * tl.load(weight_2_ptr + channels * K + k, mask=ok, other=0.0).to(
                tl.float32
            )
        if k < K - 2:
            following = tl.load(window + (k + 1) * stride_sk, mask=ok, other=0.0)
        else:
            following = x.to(previous.dtype)
        tl.store(window + k * stride_sk, tl.where(moves, following, previous), mask=ok)
        previous = following
    tl.store(y_ptr + row * C + channels, acc.to(y_ptr.dtype.element_ty), mask=ok)
    if TWO:
        tl.store(y_2_ptr + row * C + channels, acc_2.to(y_2_ptr.dtype.element_ty), mask=ok)


def causal_conv_step_triton(
    x: torch.Tensor, filters: list[tuple[torch.Tensor, torch.Tensor | None]], state: torch.Tensor, length: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One decoding step of `ttt_ops.causal_conv1d` for one or two filter banks over the same input, in one
    launch: x [B, 1, C]; filters [(weight [C, 1, K], bias [C] or None)], K >= 2; state [B, K-1, C] in x's dtype
    on x's device; length [B] (0: the row's window stays). The state moves in place when it owns contiguous
    memory (as the cache's does), else in a copy. Returns the outputs [B, 1, C] (x's dtype), one per bank, and
    the state."""
    if not _on_triton_device(x):
        raise RuntimeError(
            "causal_conv_step_triton on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "triton"
        )
    batch, tokens, channels = x.shape
    width = _check_filter_banks("causal_conv_step_triton", x, filters, state)
    if tokens != 1 or width < 2:
        raise ValueError(
            f"causal_conv_step_triton takes one token x [B, 1, C] and filter banks of width K >= 2; got x "
            f"{tuple(x.shape)}, width {width}"
        )
    if state.dtype != x.dtype or state.device != x.device:
        raise ValueError(
            f"the state must be on x's device in x's dtype ({x.device}, {x.dtype}), got {state.device}, {state.dtype}"
        )
    if not _owns_memory(state):
        state = state.contiguous().clone()
    x = x.contiguous()
    weights = [w.reshape(channels, width).contiguous() for w, _ in filters]
    biases = [b for _, b in filters]
    ys = [torch.empty(batch, 1, channels, dtype=x.dtype, device=x.device) for _ in filters]
    two = len(filters) == 2
    _causal_conv_step_kernel[(batch, triton.cdiv(channels, CONV_BLOCK))](
        x,
        state,
        length,
        weights[0],
        biases[0] if biases[0] is not None else weights[0],
        weights[-1],
        biases[-1] if biases[-1] is not None else weights[-1],
        ys[0],
        ys[-1],
        channels,
        x.stride(0),
        state.stride(0),
        state.stride(1),
        K=width,
        BLOCK=CONV_BLOCK,
        HAS_BIAS=biases[0] is not None,
        TWO=two,
        num_warps=2,
    )
    return ys, state
