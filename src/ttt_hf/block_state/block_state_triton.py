"""Triton kernels of the Block-State S4D layer, in fp32 (complex numbers as separate real/imaginary parts).

The torch references, which define the numbers, live next door in ssm_ops.py:
- `s4d_kernel_triton` == `ssm_ops.s4d_kernel_reference`: the Vandermonde sum
  `K[c, l] = 2 Re(sum_n W[c, n] exp(dtA[c, n] l))` with `W = C dB`, forward and backward;
- `s4d_scan_triton` == `ssm_ops.s4d_causal_conv_reference`: the whole convolution `y = K * u + skip u` as the
  recurrence `h[t] = z h[t-1] + u[t]`, `y[t] = 2 Re(sum_n W[n] h[n, t]) + skip u[t]` (z = exp(dt A), W = C dB),
  one program per (row, channel block) sweeping the sequence with the state in registers, forward and backward;
- `s4d_step_triton` == `ssm_ops.s4d_decode_step_reference`: one decoding step of the recurrence with the
  discretization, the state update, the output and the skip term fused into one launch.
Channels `c` flatten (filter, feature); `n` runs over the N/2 complex modes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_C = 16
_BLOCK_L = 128
# Lags per program of the backward: the partial sums of the programs of one channel block are added in torch.
_BWD_SPLIT = 4096


# 2 pi = _TWO_PI_HI + _TWO_PI_LO, with _TWO_PI_HI = 201/32 short enough that k * _TWO_PI_HI is exact in fp32.
_TWO_PI_HI = tl.constexpr(6.28125)
_TWO_PI_LO = tl.constexpr(0.0019353071795864769)


@triton.jit
def _wrap_angle(angle):
    """angle - 2 pi k in [-pi, pi] (Cody-Waite): at 64k lags the angles reach 1e5 rad, beyond the range
    where hardware sin/cos approximations are accurate."""
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    return (angle - k * _TWO_PI_HI) - k * _TWO_PI_LO


@triton.jit
def _s4d_kernel_fwd(
    ar_ptr,
    ai_ptr,
    wr_ptr,
    wi_ptr,
    k_ptr,
    channels,
    length,
    MODES: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rl = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    mc = rc < channels
    lag = rl.to(tl.float32)[None, :]
    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    for n in range(MODES):
        ar = tl.load(ar_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
        ai = tl.load(ai_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
        wr = tl.load(wr_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
        wi = tl.load(wi_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
        angle = _wrap_angle(ai * lag)
        acc += tl.exp(ar * lag) * (wr * tl.cos(angle) - wi * tl.sin(angle))
    offsets = rc.to(tl.int64)[:, None] * length + rl[None, :]
    tl.store(k_ptr + offsets, 2 * acc, mask=mc[:, None] & (rl < length)[None, :])


@triton.jit
def _s4d_kernel_bwd(
    ar_ptr,
    ai_ptr,
    wr_ptr,
    wi_ptr,
    grad_ptr,
    d_ar_ptr,
    d_ai_ptr,
    d_wr_ptr,
    d_wi_ptr,
    channels,
    length,
    MODES: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Program (channel block, mode, lag split): partial gradients of that mode over SPLIT lags."""
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(1)
    split = tl.program_id(2)
    mc = rc < channels
    ar = tl.load(ar_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
    ai = tl.load(ai_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
    wr = tl.load(wr_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
    wi = tl.load(wi_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
    acc_ar = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    acc_ai = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    acc_wr = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    acc_wi = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    for start in range(split * SPLIT, split * SPLIT + SPLIT, BLOCK_L):
        rl = start + tl.arange(0, BLOCK_L)
        mask = mc[:, None] & (rl < length)[None, :]
        grad = tl.load(grad_ptr + rc.to(tl.int64)[:, None] * length + rl[None, :], mask=mask, other=0.0)
        lag = rl.to(tl.float32)[None, :]
        angle = _wrap_angle(ai * lag)
        scaled = 2 * grad * tl.exp(ar * lag)
        g_cos = scaled * tl.cos(angle)  # dL/dWr
        g_sin = scaled * tl.sin(angle)  # -dL/dWi
        acc_wr += g_cos
        acc_wi -= g_sin
        acc_ar += lag * (wr * g_cos - wi * g_sin)
        acc_ai -= lag * (wr * g_sin + wi * g_cos)
    out = (split * channels + rc) * MODES + n
    tl.store(d_ar_ptr + out, tl.sum(acc_ar, axis=1), mask=mc)
    tl.store(d_ai_ptr + out, tl.sum(acc_ai, axis=1), mask=mc)
    tl.store(d_wr_ptr + out, tl.sum(acc_wr, axis=1), mask=mc)
    tl.store(d_wi_ptr + out, tl.sum(acc_wi, axis=1), mask=mc)


class S4DKernelFunction(torch.autograd.Function):
    """K [C, L] from dtA and W given as real/imaginary parts [C, n] (fp32, contiguous)."""

    @staticmethod
    def forward(ctx, ar, ai, wr, wi, length: int):
        channels, modes = ar.shape
        kernel = torch.empty(channels, length, device=ar.device, dtype=torch.float32)
        grid = (triton.cdiv(channels, _BLOCK_C), triton.cdiv(length, _BLOCK_L))
        _s4d_kernel_fwd[grid](ar, ai, wr, wi, kernel, channels, length, MODES=modes, BLOCK_C=_BLOCK_C, BLOCK_L=_BLOCK_L)
        ctx.save_for_backward(ar, ai, wr, wi)
        return kernel

    @staticmethod
    def backward(ctx, grad):
        ar, ai, wr, wi = ctx.saved_tensors
        channels, modes = ar.shape
        length = grad.shape[-1]
        splits = triton.cdiv(length, _BWD_SPLIT)
        partials = torch.empty(4, splits, channels, modes, device=ar.device, dtype=torch.float32)
        grid = (triton.cdiv(channels, _BLOCK_C), modes, splits)
        _s4d_kernel_bwd[grid](
            ar,
            ai,
            wr,
            wi,
            grad.float().contiguous(),
            *partials,
            channels,
            length,
            MODES=modes,
            SPLIT=_BWD_SPLIT,
            BLOCK_C=_BLOCK_C,
            BLOCK_L=_BLOCK_L,
        )
        d_ar, d_ai, d_wr, d_wi = partials.sum(1)
        return d_ar, d_ai, d_wr, d_wi, None


def s4d_kernel_triton(dt_a: torch.Tensor, c_db: torch.Tensor, length: int) -> torch.Tensor:
    """`K[l] = 2 Re(sum_n (C dB)[n] exp(dt A[n] l))`: dt_a, c_db complex64 [F, D, n] -> fp32 [F, D, length]."""
    shape, modes = dt_a.shape[:-1], dt_a.shape[-1]

    def parts(z):
        return z.real.reshape(-1, modes).contiguous(), z.imag.reshape(-1, modes).contiguous()

    kernel = S4DKernelFunction.apply(*parts(dt_a), *parts(c_db), length)
    return kernel.view(*shape, length)


@triton.jit
def _s4d_step_fwd(
    u_ptr,
    x_ptr,
    new_x_ptr,
    y_ptr,
    log_a_real_ptr,
    a_imag_ptr,
    log_dt_ptr,
    c_ptr,
    skip_ptr,
    active_ptr,
    channels,
    features,
    MODES: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (row, channel block). x/new_x: [B, C, n, 2] (complex64 as pairs); c: [C, n, 2]; y: [B, C] in its
    own dtype."""
    row = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rn = tl.arange(0, MODES)
    mc = rc < channels
    mask = mc[:, None]
    params = rc[:, None] * MODES + rn[None, :]
    a_real = -tl.exp(tl.load(log_a_real_ptr + params, mask=mask, other=0.0).to(tl.float32))
    a_imag = tl.load(a_imag_ptr + params, mask=mask, other=0.0).to(tl.float32)
    dt = tl.exp(tl.load(log_dt_ptr + rc, mask=mc, other=0.0).to(tl.float32))[:, None]
    # Zero-order hold: z = exp(dt A), dB = (z - 1) / A; expm1 keeps dB accurate when dt A is tiny.
    ar, ai = dt * a_real, dt * a_imag
    magnitude = tl.exp(ar)
    z_r, z_i = magnitude * tl.cos(ai), magnitude * tl.sin(ai)
    # Re(exp(dt A) - 1) = expm1(ar) cos(ai) - 2 sin(ai/2)^2, with expm1 by its Taylor series near 0.
    expm1_ar = tl.where(tl.abs(ar) < 1e-2, ar * (1 + ar * (0.5 + ar * (1 / 6 + ar / 24))), magnitude - 1)
    half_sin = tl.sin(0.5 * ai)
    em1_r = expm1_ar * tl.cos(ai) - 2 * half_sin * half_sin
    em1_i = z_i
    denominator = a_real * a_real + a_imag * a_imag
    db_r = (em1_r * a_real + em1_i * a_imag) / denominator
    db_i = (em1_i * a_real - em1_r * a_imag) / denominator
    u_c = tl.load(u_ptr + row * features + rc % features, mask=mc, other=0.0).to(tl.float32)
    u = u_c[:, None]
    state = (row * channels + rc[:, None]).to(tl.int64) * MODES * 2 + rn[None, :] * 2
    x_r = tl.load(x_ptr + state, mask=mask, other=0.0)
    x_i = tl.load(x_ptr + state + 1, mask=mask, other=0.0)
    active = tl.load(active_ptr + row) != 0
    new_r = tl.where(active, z_r * x_r - z_i * x_i + db_r * u, x_r)
    new_i = tl.where(active, z_r * x_i + z_i * x_r + db_i * u, x_i)
    tl.store(new_x_ptr + state, new_r, mask=mask)
    tl.store(new_x_ptr + state + 1, new_i, mask=mask)
    c_r = tl.load(c_ptr + params * 2, mask=mask, other=0.0).to(tl.float32)
    c_i = tl.load(c_ptr + params * 2 + 1, mask=mask, other=0.0).to(tl.float32)
    y = 2 * tl.sum(c_r * new_r - c_i * new_i, axis=1) + tl.load(skip_ptr + rc, mask=mc, other=0.0).to(tl.float32) * u_c
    tl.store(y_ptr + row * channels + rc, y.to(y_ptr.dtype.element_ty), mask=mc)


def s4d_step_triton(
    u: torch.Tensor,
    x: torch.Tensor,
    log_a_real: torch.Tensor,
    a_imag: torch.Tensor,
    log_dt: torch.Tensor,
    c: torch.Tensor,
    skip: torch.Tensor,
    active: torch.Tensor,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step from the raw S4D parameters (no autograd), read in their own dtypes and computed in fp32.
    u: [B, D]; x: [B, F, D, n] complex64; log_a_real, a_imag: [F, D, n]; log_dt, skip: [F, D]; c: [F, D, n, 2];
    active: [B] bool. Returns y [B, F, D] in `out_dtype` (skip term included) and the new state."""
    batch, filters, features, modes = x.shape
    channels = filters * features
    new_x = torch.empty_like(x)
    y = torch.empty(batch, filters, features, device=u.device, dtype=out_dtype)
    grid = (batch, triton.cdiv(channels, _BLOCK_C))
    _s4d_step_fwd[grid](
        u.contiguous(),
        torch.view_as_real(x.contiguous()),
        torch.view_as_real(new_x),
        y,
        log_a_real.contiguous(),
        a_imag.contiguous(),
        log_dt.contiguous(),
        c.contiguous(),
        skip.contiguous(),
        active.view(torch.int8),
        channels,
        features,
        MODES=modes,
        BLOCK_C=_BLOCK_C,
    )
    return y, new_x


@torch.library.custom_op("ttt_hf::s4d_step", mutates_args=())
def s4d_step_op(
    u: torch.Tensor,
    x: torch.Tensor,
    log_a_real: torch.Tensor,
    a_imag: torch.Tensor,
    log_dt: torch.Tensor,
    c: torch.Tensor,
    skip: torch.Tensor,
    active: torch.Tensor,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`s4d_step_triton` as one opaque operator for `torch.compile`, whose tracer cannot follow the launch code."""
    return s4d_step_triton(u, x, log_a_real, a_imag, log_dt, c, skip, active, out_dtype)


@s4d_step_op.register_fake
def _(u, x, log_a_real, a_imag, log_dt, c, skip, active, out_dtype):
    return u.new_empty(x.shape[:3], dtype=out_dtype), torch.empty_like(x)


# Launch of the scan kernels: (channels per program, time steps per group, warps). A group's inputs are
# loaded as one tile while the previous group computes (loads cannot move past the stores of the outputs,
# which might alias them, so one load per step would expose the memory latency at every step).
# Every channel offset is multiplied by `lane_stride` (always 1, never specialized): without it the
# compiler vectorizes the loads along channels and picks layouts that spread a channel's modes and time
# steps over several threads, so that every step's sums would cross threads.
_SCAN_LAUNCH = {"forward": (32, 16, 1), "backward": (32, 8, 1)}
# The sequence is cut into segments swept in parallel when the channels alone give fewer than this many
# programs per SM (the sweep of one program is latency-bound), each segment at least _SCAN_MIN_SEGMENT long.
_SCAN_PROGRAMS_PER_SM = 16
_SCAN_MIN_SEGMENT = 2048


@triton.jit
def _step(tile, rt, i):
    """Step i of a [C, GROUP] tile as a [C] vector (each thread holds whole rows: no data moves)."""
    return tl.sum(tl.where(rt[None, :] == i, tile, 0.0), axis=1)


@triton.jit
def _segment_state(row, rn, lane, channels, BLOCK_N: tl.constexpr):
    """Offsets of a program's [C, modes] tile in a per-segment state buffer [re/im, B, S, BLOCK_N, C], and the
    distance from the real to the imaginary parts."""
    index = row * tl.num_programs(2) + tl.program_id(2)
    imag = tl.num_programs(0) * tl.num_programs(2) * BLOCK_N * channels
    return lane[:, None] + (index * BLOCK_N + rn[None, :]) * channels, imag


@triton.jit
def _load_pair(ptr, offsets, imag, mask):
    """Real and imaginary parts of a complex tile stored as two planes `imag` elements apart (0 where masked)."""
    return tl.load(ptr + offsets, mask=mask, other=0.0), tl.load(ptr + imag + offsets, mask=mask, other=0.0)


@triton.jit
def _store_pair(ptr, offsets, imag, real_part, imag_part, mask):
    tl.store(ptr + offsets, real_part, mask=mask)
    tl.store(ptr + imag + offsets, imag_part, mask=mask)


@triton.jit(do_not_specialize=["lane_stride"])
def _s4d_scan_fwd(
    u_ptr,
    z_ptr,
    w_ptr,
    skip_ptr,
    y_ptr,
    state_ptr,
    length,
    segment,
    features,
    channels,
    lane_stride,
    MODES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GROUP: tl.constexpr,
    FROM_STATE: tl.constexpr,
    OUTPUTS: tl.constexpr,
):
    """Program (row, channel block, segment of `segment` steps): u [B, L, D]; y [B, L, C] with channel
    c = (filter, feature c % D); z, w [re/im, modes, C]; state [re/im, B, S, BLOCK_N, C].
    OUTPUTS: y over the segment, from the state before it (FROM_STATE) or zero; else only the state at the
    segment's end from a zero state (exact for every segment but the last, whose end state is not used).

    Tiles are [channels, modes or steps], one channel per thread: sums over modes stay inside a thread."""
    row = tl.program_id(0).to(tl.int64)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rn = tl.arange(0, BLOCK_N)
    rt = tl.arange(0, GROUP)
    mc = rc < channels
    mask = mc[:, None] & (rn < MODES)[None, :]
    lane = rc * lane_stride
    params = lane[:, None] + rn[None, :] * channels
    # Padded modes get z = W = 0: they contribute nothing.
    zr, zi = _load_pair(z_ptr, params, MODES * channels, mask)
    state, imag = _segment_state(row, rn, lane, channels, BLOCK_N)
    hr, hi = _load_pair(state_ptr, state, imag, mask & FROM_STATE)  # zero without an entering state
    if OUTPUTS:
        wr, wi = _load_pair(w_ptr, params, MODES * channels, mask)
        skip = tl.load(skip_ptr + lane, mask=mc, other=0.0)
    u_tile = u_ptr + row * length * features + ((rc % features) * lane_stride)[:, None] + rt[None, :] * features
    y_tile = y_ptr + row * length * channels + lane[:, None] + rt[None, :] * channels
    begin = tl.program_id(2) * segment
    end = tl.minimum(begin + segment, length)
    following = tl.load(u_tile + begin * features, mask=mc[:, None] & ((begin + rt) < end)[None, :], other=0.0)
    for start in range(begin, end, GROUP):
        current = following.to(tl.float32)
        ahead = mc[:, None] & ((start + GROUP + rt) < end)[None, :]
        following = tl.load(u_tile + (start + GROUP) * features, mask=ahead, other=0.0)
        if OUTPUTS:
            out = tl.zeros([BLOCK_C, GROUP], dtype=tl.float32)
            for i in tl.static_range(GROUP):
                u = _step(current, rt, i)
                hr, hi = zr * hr - zi * hi + u[:, None], zr * hi + zi * hr
                y = 2 * tl.sum(wr * hr - wi * hi, axis=1) + skip * u
                out = tl.where(rt[None, :] == i, y[:, None], out)
            inside = mc[:, None] & ((start + rt) < end)[None, :]
            tl.store(y_tile + start * channels, out.to(y_ptr.dtype.element_ty), mask=inside)
        else:
            for i in tl.static_range(GROUP):
                u = _step(current, rt, i)
                hr, hi = zr * hr - zi * hi + u[:, None], zr * hi + zi * hr
    if not OUTPUTS:
        _store_pair(state_ptr, state, imag, hr, hi, mask)


@triton.jit(do_not_specialize=["lane_stride"])
def _s4d_scan_bwd(
    u_ptr,
    dy_ptr,
    z_ptr,
    w_ptr,
    skip_ptr,
    du_ptr,
    g_ptr,
    h_ptr,
    dskip_ptr,
    r_ptr,
    q_ptr,
    length,
    segment,
    features,
    lane_stride,
    FILTERS: tl.constexpr,
    MODES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GROUP: tl.constexpr,
    FROM_STATE: tl.constexpr,
    OUTPUTS: tl.constexpr,
):
    """Program (row, feature block, segment), over every filter of those features in turn (so that du, a sum
    over filters, has one writer). Reverse sweep with r[t] = z r[t+1] + dy[t] (the adjoint of h) and
    q[t] = z q[t+1] + r[t+1] (its derivative in z); per channel and mode it sums G = sum_t u r and
    H = sum_t u q: dL/dW = G, dL/dz = W H (holomorphic derivatives). Segments and group steps run backwards
    in time: reversed index j is t = L - 1 - j. z, w [re/im, modes, C]; r, q (the adjoint state entering the
    segment, or with OUTPUTS=False the one leaving it from zero), g, h: [re/im, B, S, BLOCK_N, C]; dskip:
    [B, S, C]."""
    row = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rn = tl.arange(0, BLOCK_N)
    rt = tl.arange(0, GROUP)
    md = rd < features
    mask = md[:, None] & (rn < MODES)[None, :]
    channels = FILTERS * features
    steps = (length - 1 - rt)[None, :]
    u_tile = u_ptr + row * length * features + (rd * lane_stride)[:, None] + steps * features
    du_tile = du_ptr + row * length * features + (rd * lane_stride)[:, None] + steps * features
    begin = tl.program_id(2) * segment
    end = tl.minimum(begin + segment, length)
    for f in range(FILTERS):
        rc = f * features + rd
        lane = rc * lane_stride
        params = lane[:, None] + rn[None, :] * channels
        zr, zi = _load_pair(z_ptr, params, MODES * channels, mask)
        state, imag = _segment_state(row, rn, lane, channels, BLOCK_N)
        rr, ri = _load_pair(r_ptr, state, imag, mask & FROM_STATE)  # zero without an entering state
        qr, qi = _load_pair(q_ptr, state, imag, mask & FROM_STATE)
        dy_tile = dy_ptr + row * length * channels + lane[:, None] + steps * channels
        first = md[:, None] & ((begin + rt) < end)[None, :]
        dy_next = tl.load(dy_tile - begin * channels, mask=first, other=0.0)
        if OUTPUTS:
            wr, wi = _load_pair(w_ptr, params, MODES * channels, mask)
            skip = tl.load(skip_ptr + lane, mask=md, other=0.0)
            g_r = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
            g_i = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
            h_r = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
            h_i = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
            d_skip = tl.zeros([BLOCK_C], dtype=tl.float32)
            u_next = tl.load(u_tile - begin * features, mask=first, other=0.0)
            # du sums over filters: from the second filter on, add to what the previous sweeps stored.
            du_next = tl.load(du_tile - begin * features, mask=first & (f > 0), other=0.0)
        for start in range(begin, end, GROUP):
            dy_group = dy_next.to(tl.float32)
            ahead = md[:, None] & ((start + GROUP + rt) < end)[None, :]
            dy_next = tl.load(dy_tile - (start + GROUP) * channels, mask=ahead, other=0.0)
            if OUTPUTS:
                u_group, du_group = u_next.to(tl.float32), du_next.to(tl.float32)
                u_next = tl.load(u_tile - (start + GROUP) * features, mask=ahead, other=0.0)
                du_next = tl.load(du_tile - (start + GROUP) * features, mask=ahead & (f > 0), other=0.0)
                for i in tl.static_range(GROUP):
                    u = _step(u_group, rt, i)
                    dy = _step(dy_group, rt, i)
                    qr, qi = zr * qr - zi * qi + rr, zr * qi + zi * qr + ri
                    rr, ri = zr * rr - zi * ri + dy[:, None], zr * ri + zi * rr
                    g_r += u[:, None] * rr
                    g_i += u[:, None] * ri
                    h_r += u[:, None] * qr
                    h_i += u[:, None] * qi
                    d_skip += u * dy
                    du = 2 * tl.sum(wr * rr - wi * ri, axis=1) + skip * dy
                    du_group += tl.where(rt[None, :] == i, du[:, None], 0.0)
                inside = md[:, None] & ((start + rt) < end)[None, :]
                tl.store(du_tile - start * features, du_group.to(du_ptr.dtype.element_ty), mask=inside)
            else:
                for i in tl.static_range(GROUP):
                    dy = _step(dy_group, rt, i)
                    qr, qi = zr * qr - zi * qi + rr, zr * qi + zi * qr + ri
                    rr, ri = zr * rr - zi * ri + dy[:, None], zr * ri + zi * rr
        if OUTPUTS:
            _store_pair(g_ptr, state, imag, g_r, g_i, mask)
            _store_pair(h_ptr, state, imag, h_r, h_i, mask)
            index = row * tl.num_programs(2) + tl.program_id(2)
            tl.store(dskip_ptr + index * channels + lane, d_skip, mask=md)
        else:
            _store_pair(r_ptr, state, imag, rr, ri, mask)
            _store_pair(q_ptr, state, imag, qr, qi, mask)


def _segments(length: int, programs: int, group: int, device: torch.device) -> tuple[int, int]:
    """(number, length) of the segments of a sweep of `length` steps whose channels give `programs` programs."""
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = _SCAN_PROGRAMS_PER_SM * processors  # the interpreter counts as one SM
    count = max(1, min(triton.cdiv(wanted, programs), length // _SCAN_MIN_SEGMENT))
    segment = max(group, triton.cdiv(triton.cdiv(length, count), group) * group)
    return max(1, triton.cdiv(length, segment)), segment


def _chain(ends: torch.Tensor, transfer) -> torch.Tensor:
    """State entering each segment from the states `ends` [S, ...] that each segment leaves from a zero start:
    entering[s] = transfer(entering[s-1]) + ends[s-1], entering[0] = 0 (the recurrence is linear)."""
    entering = torch.zeros_like(ends)
    for s in range(1, ends.shape[0]):
        entering[s] = transfer(entering[s - 1]) + ends[s - 1]
    return entering


def _complex(parts: torch.Tensor) -> torch.Tensor:
    """[re/im, B, S, BLOCK_N, C] -> complex [S, B, BLOCK_N, C]."""
    return torch.complex(parts[0], parts[1]).transpose(0, 1)


def _parts(state: torch.Tensor) -> torch.Tensor:
    """complex [S, B, BLOCK_N, C] -> [re/im, B, S, BLOCK_N, C] (contiguous)."""
    state = state.transpose(0, 1)
    return torch.stack([state.real, state.imag]).contiguous()


class S4DScanFunction(torch.autograd.Function):
    """y [B, L, F, D] (out_dtype) from u [B, L, D] (any float dtype), z = exp(dt A) and W = C dB as real and
    imaginary planes [2, n, C] (mode-major, C = F D channels) and skip [C] (fp32, contiguous).

    A long sequence is swept in segments: a first pass of each kernel computes the state every segment
    reaches from zero, `_chain` turns them into the state entering each segment, and the second pass
    computes the outputs from there."""

    @staticmethod
    def forward(ctx, u, z, w, skip, filters: int, out_dtype: torch.dtype):
        batch, length, features = u.shape
        modes, channels = z.shape[1:]
        block_n = triton.next_power_of_2(modes)
        y = torch.empty(batch, length, filters, features, device=u.device, dtype=out_dtype)
        block_c, group, warps = _SCAN_LAUNCH["forward"]
        count, segment = _segments(length, batch * triton.cdiv(channels, block_c), group, u.device)
        state = torch.zeros(2, batch, count, block_n, channels, device=u.device)

        def sweep(outputs: bool) -> None:
            _s4d_scan_fwd[(batch, triton.cdiv(channels, block_c), count)](
                u,
                z,
                w,
                skip,
                y,
                state,
                length,
                segment,
                features,
                channels,
                1,
                MODES=modes,
                BLOCK_N=block_n,
                BLOCK_C=block_c,
                GROUP=group,
                FROM_STATE=outputs and count > 1,
                OUTPUTS=outputs,
                num_warps=warps,
            )

        if count > 1:
            sweep(outputs=False)
            decay = _padded(torch.complex(z[0], z[1]), block_n) ** segment
            state = _parts(_chain(_complex(state), lambda h: decay * h))
        sweep(outputs=True)
        ctx.save_for_backward(u, z, w, skip)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, z, w, skip = ctx.saved_tensors
        batch, length, features = u.shape
        modes, channels = z.shape[1:]
        filters = channels // features
        block_n = triton.next_power_of_2(modes)
        dy = dy.contiguous()
        # du sums over filters: accumulate in fp32 across the program's filter sweeps when there are several.
        du = torch.empty_like(u, dtype=u.dtype if filters == 1 else torch.float32)
        block_c, group, warps = _SCAN_LAUNCH["backward"]
        count, segment = _segments(length, batch * triton.cdiv(features, block_c), group, u.device)
        r, q, g, h = (torch.zeros(2, batch, count, block_n, channels, device=u.device) for _ in range(4))
        d_skip = torch.zeros(batch, count, channels, device=u.device)

        def sweep(outputs: bool) -> None:
            _s4d_scan_bwd[(batch, triton.cdiv(features, block_c), count)](
                u,
                dy,
                z,
                w,
                skip,
                du,
                g,
                h,
                d_skip,
                r,
                q,
                length,
                segment,
                features,
                1,
                FILTERS=filters,
                MODES=modes,
                BLOCK_N=block_n,
                BLOCK_C=block_c,
                GROUP=group,
                FROM_STATE=outputs and count > 1,
                OUTPUTS=outputs,
                num_warps=warps,
            )

        if count > 1:
            sweep(outputs=False)
            z_padded = _padded(torch.complex(z[0], z[1]), block_n)
            decay, lag = z_padded**segment, segment * z_padded ** (segment - 1)
            # Across a segment without inputs: r <- z^L r, q <- z^L q + L z^(L-1) r.
            adjoint = _chain(
                torch.stack([_complex(r), _complex(q)], 1),
                lambda a: torch.stack([decay * a[0], decay * a[1] + lag * a[0]]),
            )
            r, q = _parts(adjoint[:, 0]), _parts(adjoint[:, 1])
        sweep(outputs=True)
        g, h = (_complex(x).sum((0, 1))[:modes] for x in (g, h))  # [n, C]
        d_z = torch.complex(w[0], w[1]) * h

        def real_gradient(derivative):  # of a real loss of y = 2 Re(F(p)), F holomorphic: (2 Re F', -2 Im F')
            return torch.stack([2 * derivative.real, -2 * derivative.imag])

        return du.to(u.dtype), real_gradient(d_z), real_gradient(g), d_skip.sum((0, 1)), None, None


def _padded(z: torch.Tensor, block_n: int) -> torch.Tensor:
    """[n, C] -> [BLOCK_N, C] with zeros for the padded modes (as the kernels load them)."""
    return torch.nn.functional.pad(z, (0, 0, 0, block_n - z.shape[0]))


def s4d_scan_triton(
    u: torch.Tensor, dt_a: torch.Tensor, c_db: torch.Tensor, skip: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`y = K * u + skip u` with `K[l] = 2 Re(sum_n (C dB)[n] exp(dt A[n] l))`, exactly causal: u [B, L, D]
    (any float dtype); dt_a, c_db complex64 [F, D, n]; skip [F, D]. Returns [B, L, F, D] in out_dtype."""
    filters, _, modes = dt_a.shape

    def planes(x):  # complex [F, D, n] -> real and imaginary planes [2, n, F D]
        x = x.reshape(-1, modes).T
        return torch.stack([x.real, x.imag])

    return S4DScanFunction.apply(
        u.contiguous(), planes(torch.exp(dt_a)), planes(c_db), skip.float().reshape(-1).contiguous(), filters, out_dtype
    )


@triton.jit
def _rotary(
    src_ptr,
    dst_ptr,
    position_ptr,
    inv_freq_ptr,
    tokens,
    src_stride,
    dst_stride,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    INVERSE: tl.constexpr,
):
    """Program (token block, head): rotary embedding of one head's [BLOCK_T, 2 HALF] slice (half-split pairs),
    or its inverse (the backward). Tokens are rows of `src_stride` / `dst_stride` elements."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rj = tl.arange(0, HALF)
    mask = (rt < tokens)[:, None]
    angle = _wrap_angle(
        tl.load(position_ptr + rt, mask=rt < tokens, other=0).to(tl.float32)[:, None]
        * tl.load(inv_freq_ptr + rj)[None, :]
    )
    cos, sin = tl.cos(angle), tl.sin(angle)
    if INVERSE:
        sin = -sin
    head = tl.program_id(1) * 2 * HALF + rj[None, :]
    src = src_ptr + rt.to(tl.int64)[:, None] * src_stride + head
    dst = dst_ptr + rt.to(tl.int64)[:, None] * dst_stride + head
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


_ROTARY_BLOCK_T = 32


def _rotate(
    src: torch.Tensor, dst: torch.Tensor, heads: int, position: torch.Tensor, inv_freq: torch.Tensor, inverse: bool
) -> None:
    """Rotates heads [0, heads) of src [B, S, *, hd] into the same heads of dst (both contiguous)."""
    tokens = src.shape[0] * src.shape[1]
    _rotary[(triton.cdiv(tokens, _ROTARY_BLOCK_T), heads)](
        src,
        dst,
        position,
        inv_freq,
        tokens,
        src.stride(1),
        dst.stride(1),
        HALF=src.shape[-1] // 2,
        BLOCK_T=_ROTARY_BLOCK_T,
        INVERSE=inverse,
    )


class RotaryConcatFunction(torch.autograd.Function):
    """[B, S, H, hd] rotated at `position` [B, S], then `plain` [B, S, H2, hd] (or nothing) along the head axis,
    written once into the result (instead of rotating, negating, concatenating and adding in torch)."""

    @staticmethod
    def forward(ctx, rotated, plain, position, inv_freq):
        batch, slots, heads, head_dim = rotated.shape
        extra = 0 if plain is None else plain.shape[2]
        out = rotated.new_empty(batch, slots, heads + extra, head_dim)
        _rotate(rotated, out, heads, position, inv_freq, inverse=False)
        if plain is not None:
            out[:, :, heads:].copy_(plain)
        ctx.save_for_backward(position, inv_freq)
        ctx.heads, ctx.has_plain = heads, plain is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        position, inv_freq = ctx.saved_tensors
        grad = grad.contiguous()
        d_rotated = grad.new_empty(*grad.shape[:2], ctx.heads, grad.shape[-1])
        _rotate(grad, d_rotated, ctx.heads, position, inv_freq, inverse=True)
        return d_rotated, grad[:, :, ctx.heads :] if ctx.has_plain else None, None, None


def rotary_concat_triton(
    rotated: torch.Tensor, plain: torch.Tensor | None, position: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """`torch.cat([apply_rope(rotated, position), plain], dim=2)` in one pass: rotated [B, S, H, hd], plain
    [B, S, H2, hd] or None, position [B, S], inv_freq [hd / 2] fp32 (hd / 2 a power of two)."""
    plain = None if plain is None else plain.contiguous()
    return RotaryConcatFunction.apply(rotated.contiguous(), plain, position.contiguous(), inv_freq.float().contiguous())


@triton.jit
def _rotated(x1, x2, cos, sin):
    """Rotary embedding of the pairs (x1, x2), computed in fp32 and rounded back to their dtype."""
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    return (a * cos - b * sin).to(x1.dtype), (b * cos + a * sin).to(x2.dtype)


@triton.jit
def _slot_attention_step(
    query_ptr,
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    out_ptr,
    offset_ptr,
    active_ptr,
    position_ptr,
    inv_freq_ptr,
    scale,
    query_row_stride,
    key_row_stride,
    value_row_stride,
    out_row_stride,
    out_first_head,
    cache_row_stride,
    cache_slot_stride,
    HALF: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ROTARY: tl.constexpr,
):
    """Program (row, head): one decoding token's query attends to the slots of its block up to its own, in fp32
    with an online softmax; then its key and value go to its slot. With ROTARY the query and the key are rotated
    first (half-split pairs, rounded to their dtypes as the unfused path rounds them). The token's own slot is
    read from registers (the cache is written only after the sweep, so no thread reads a slot another wrote); a
    row that is not active attends to its cache as it is and leaves it unchanged. Vectors are handled as their
    two halves, the rotary embedding's pairs."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    rj = tl.arange(0, HALF)
    offset = tl.load(offset_ptr + row)
    active = tl.load(active_ptr + row) != 0
    q = query_ptr + row * query_row_stride + head * 2 * HALF + rj
    q1, q2 = tl.load(q), tl.load(q + HALF)
    k = key_ptr + row * key_row_stride + head * 2 * HALF + rj
    k1, k2 = tl.load(k), tl.load(k + HALF)
    if ROTARY:
        angle = _wrap_angle(tl.load(position_ptr + row).to(tl.float32) * tl.load(inv_freq_ptr + rj))
        cos, sin = tl.cos(angle), tl.sin(angle)
        q1, q2 = _rotated(q1, q2, cos, sin)
        k1, k2 = _rotated(k1, k2, cos, sin)
    q1, q2 = q1.to(tl.float32) * scale, q2.to(tl.float32) * scale
    cache = row.to(tl.int64) * cache_row_stride + head * 2 * HALF
    own = cache + offset * cache_slot_stride + rj
    own_k1 = tl.where(active, k1.to(key_cache_ptr.dtype.element_ty), tl.load(key_cache_ptr + own))
    own_k2 = tl.where(active, k2.to(key_cache_ptr.dtype.element_ty), tl.load(key_cache_ptr + own + HALF))
    v = value_ptr + row * value_row_stride + head * 2 * HALF + rj
    own_v1 = tl.where(active, tl.load(v).to(value_cache_ptr.dtype.element_ty), tl.load(value_cache_ptr + own))
    own_v2 = tl.where(
        active, tl.load(v + HALF).to(value_cache_ptr.dtype.element_ty), tl.load(value_cache_ptr + own + HALF)
    )

    lanes = tl.arange(0, BLOCK_W)
    running_max = tl.max(tl.full([BLOCK_W], float("-inf"), tl.float32), axis=0)
    running_sum = tl.sum(tl.zeros([BLOCK_W], tl.float32), axis=0)
    acc1 = tl.zeros([HALF], tl.float32)
    acc2 = tl.zeros([HALF], tl.float32)
    for start in range(0, offset + 1, BLOCK_W):
        slot = start + lanes
        is_own = (slot == offset)[:, None]
        before = (slot < offset)[:, None]
        tile = cache + slot[:, None].to(tl.int64) * cache_slot_stride + rj[None, :]
        t1 = tl.where(is_own, own_k1[None, :], tl.load(key_cache_ptr + tile, mask=before, other=0.0))
        t2 = tl.where(is_own, own_k2[None, :], tl.load(key_cache_ptr + tile + HALF, mask=before, other=0.0))
        scores = tl.sum(t1.to(tl.float32) * q1[None, :], axis=1) + tl.sum(t2.to(tl.float32) * q2[None, :], axis=1)
        scores = tl.where(slot <= offset, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        p = tl.exp(scores - new_max)
        rescale = tl.exp(running_max - new_max)
        t1 = tl.where(is_own, own_v1[None, :], tl.load(value_cache_ptr + tile, mask=before, other=0.0))
        t2 = tl.where(is_own, own_v2[None, :], tl.load(value_cache_ptr + tile + HALF, mask=before, other=0.0))
        running_sum = running_sum * rescale + tl.sum(p, axis=0)
        acc1 = acc1 * rescale + tl.sum(p[:, None] * t1.to(tl.float32), axis=0)
        acc2 = acc2 * rescale + tl.sum(p[:, None] * t2.to(tl.float32), axis=0)
        running_max = new_max
    out = out_ptr + row * out_row_stride + (out_first_head + head) * 2 * HALF + rj
    tl.store(out, (acc1 / running_sum).to(out_ptr.dtype.element_ty))
    tl.store(out + HALF, (acc2 / running_sum).to(out_ptr.dtype.element_ty))
    if active:
        tl.store(key_cache_ptr + own, own_k1)
        tl.store(key_cache_ptr + own + HALF, own_k2)
        tl.store(value_cache_ptr + own, own_v1)
        tl.store(value_cache_ptr + own + HALF, own_v2)


_SLOT_BLOCK_W = 64


def _rows_of_heads(x: torch.Tensor) -> torch.Tensor:
    """x [B, 1, h, hd] with its heads laid out back to back (a slice of a wider head axis is fine)."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


def slot_attention_step_triton(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    key_caches: list[torch.Tensor],
    value_caches: list[torch.Tensor],
    offset: torch.Tensor,
    active: torch.Tensor,
    position: torch.Tensor,
    inv_freq: torch.Tensor,
    rotated_groups: int,
) -> torch.Tensor:
    """A decoding token's block attention for groups of heads (self-attention, then SH/MH cross-attention), one
    launch per group: the first `rotated_groups` groups' queries and keys get rotary embeddings at `position`;
    each group's key and value go to the token's slot of its cached block, and its query attends to that block's
    slots up to the token's own (`modeling_block_state.BlockStateAttention._attend_own_blocks` holds the
    reference). Per group: query, key, value [B, 1, h, hd]; key_cache, value_cache [B, W, h, hd] contiguous, written
    in place. offset: [B] the token's slot; active: [B] bool (inactive rows write nothing); position: [B];
    inv_freq: [hd / 2] fp32. Returns the groups' outputs side by side, [B, 1, groups * h, hd] in the query dtype."""
    batch, _, heads, head_dim = queries[0].shape
    out = queries[0].new_empty(batch, 1, heads * len(queries), head_dim)
    for group, (query, key, value, key_cache, value_cache) in enumerate(
        zip(queries, keys, values, key_caches, value_caches)
    ):
        query, key, value = (_rows_of_heads(x) for x in (query, key, value))
        _slot_attention_step[(batch, heads)](
            query,
            key,
            value,
            key_cache,
            value_cache,
            out,
            offset,
            active.view(torch.int8),
            position,
            inv_freq,
            head_dim**-0.5,
            query.stride(0),
            key.stride(0),
            value.stride(0),
            out.stride(0),
            group * heads,
            key_cache.stride(0),
            key_cache.stride(1),
            HALF=head_dim // 2,
            BLOCK_W=_SLOT_BLOCK_W,
            ROTARY=group < rotated_groups,
        )
    return out


@torch.library.custom_op("ttt_hf::slot_attention_step", mutates_args=("key_caches", "value_caches"))
def slot_attention_step_op(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    key_caches: list[torch.Tensor],
    value_caches: list[torch.Tensor],
    offset: torch.Tensor,
    active: torch.Tensor,
    position: torch.Tensor,
    inv_freq: torch.Tensor,
    rotated_groups: int,
) -> torch.Tensor:
    """`slot_attention_step_triton` as one opaque operator for `torch.compile`, which writes the caches in place."""
    return slot_attention_step_triton(
        queries, keys, values, key_caches, value_caches, offset, active, position, inv_freq, rotated_groups
    )


@slot_attention_step_op.register_fake
def _(queries, keys, values, key_caches, value_caches, offset, active, position, inv_freq, rotated_groups):
    batch, _, heads, head_dim = queries[0].shape
    return queries[0].new_empty(batch, 1, heads * len(queries), head_dim)
