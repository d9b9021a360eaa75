"""The S4D reference ops against their definitions: direct convolution and the step-by-step recurrence."""

import math

import torch

from ttt_hf.block_state.ssm_ops import (
    fft_causal_conv,
    s4d_block_end_states,
    s4d_discretize,
    s4d_final_state,
    s4d_kernel,
    s4d_state_output,
    s4d_step,
)

FILTERS, FEATURES, MODES = 3, 5, 4


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    log_a_real = math.log(0.5) + 0.1 * torch.randn(FILTERS, FEATURES, MODES, generator=g)
    a_imag = math.pi * torch.arange(MODES).float().expand(FILTERS, FEATURES, MODES).clone()
    log_dt = torch.empty(FILTERS, FEATURES).uniform_(math.log(1e-3), math.log(1e-1), generator=g)
    c = torch.complex(
        torch.randn(FILTERS, FEATURES, MODES, generator=g), torch.randn(FILTERS, FEATURES, MODES, generator=g)
    )
    dt_a, db = s4d_discretize(log_a_real, a_imag, log_dt)
    return dt_a, db, c


def _recurrence(u, dt_a, db, c, x0=None):
    """y_t = 2 Re(C . x_t), x_t = exp(dt A) x_{t-1} + dB u_t, one step at a time."""
    batch = u.shape[0]
    x = torch.zeros(batch, *dt_a.shape, dtype=torch.complex64) if x0 is None else x0
    ys, states = [], []
    for t in range(u.shape[1]):
        y, x = s4d_step(u[:, t], x, dt_a, db, c, torch.ones(batch, dtype=torch.bool))
        ys.append(y)
        states.append(x)
    return torch.stack(ys, 1), torch.stack(states, 1)


def test_fft_convolution_is_causal_and_exact():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 37, FEATURES, generator=g)
    kernel = torch.randn(FILTERS, FEATURES, 37, generator=g)
    direct = torch.zeros(2, 37, FILTERS, FEATURES)
    for t in range(37):
        for k in range(t + 1):
            direct[:, t] += kernel[:, :, k] * u[:, t - k, None]
    torch.testing.assert_close(fft_causal_conv(u, kernel), direct, rtol=0, atol=1e-4)


def test_fft_path_matches_recurrence_at_4096_tokens():
    dt_a, db, c = _params()
    u = torch.randn(2, 4096, FEATURES, generator=torch.Generator().manual_seed(2))
    fft = fft_causal_conv(u, s4d_kernel(dt_a, c * db, u.shape[1]))
    steps, _ = _recurrence(u, dt_a, db, c)
    relative = (fft - steps).abs().max() / steps.abs().max()
    assert relative.item() <= 1e-5


def test_kernel_is_defined_for_any_length():
    dt_a, db, c = _params()
    short, long = s4d_kernel(dt_a, c * db, 64), s4d_kernel(dt_a, c * db, 1024)
    assert long.shape[-1] == 1024
    torch.testing.assert_close(long[..., :64], short, rtol=0, atol=1e-6)


def test_states_from_any_starting_point_match_the_recurrence():
    dt_a, db, c = _params(3)
    g = torch.Generator().manual_seed(4)
    u = torch.randn(2, 23, FEATURES, generator=g)
    x0 = torch.complex(torch.randn(2, *dt_a.shape, generator=g), torch.randn(2, *dt_a.shape, generator=g))
    ys, states = _recurrence(u, dt_a, db, c, x0)
    # Outputs: zero-state convolution plus the initial state's contribution.
    steps = torch.arange(1, 24)[None].expand(2, -1)
    y = fft_causal_conv(u, s4d_kernel(dt_a, c * db, 23)) + s4d_state_output(x0, dt_a, c, steps)
    torch.testing.assert_close(y, ys, rtol=0, atol=2e-4)
    # Final state of right-aligned rows of different lengths.
    length = torch.tensor([23, 9])
    u_right = u.clone()
    u_right[1] = 0
    u_right[1, -9:] = u[1, :9]
    final = s4d_final_state(u_right, x0, dt_a, db, length)
    torch.testing.assert_close(final[0], states[0, 22], rtol=0, atol=2e-5)
    torch.testing.assert_close(final[1], states[1, 8], rtol=0, atol=2e-5)
    # Block ends, with x0 sitting 3 positions before the end of block 0 (blocks of 8 slots).
    slots = torch.zeros(2, 32, FEATURES)
    slots[:, 5:28] = u
    ends = s4d_block_end_states(slots.view(2, 4, 8, FEATURES), x0, dt_a, db, torch.tensor([3, 3]))
    for m, t in enumerate([2, 10, 18]):
        torch.testing.assert_close(ends[:, m], states[:, t], rtol=0, atol=2e-5)
