"""MCM's loss equals the paper's Algorithm 1 (with Algorithm 3's aDDIM teacher step), written out here line by
line in the paper's own variables -- segment ``step``, ``n_rel``, paper time ``t = step / S + n_rel / T`` --
and fed the same data, noise and networks as ``consistency_loss`` (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.distill.consistency import consistency_loss
from fewstep.samplers import ContinuousVPSchedule, ModelDenoiser
from fewstep.samplers.timesteps import TimeUniform

F64 = torch.float64
D = 6


def _toy_network(seed: int):
    """A smooth nonlinear x-predictor ``f(z, t)`` (t: the schedule's own time)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, D, generator=g, dtype=F64) / math.sqrt(D)
    b = torch.randn(D, generator=g, dtype=F64)

    def f(z, t):
        t = torch.as_tensor(t, dtype=F64).reshape(-1, 1)
        return torch.tanh(z @ w + b * t) * (1.0 + 0.3 * t) + 0.1 * z

    return f


def algorithm_1(f_student, f_teacher, x, eps, step, n_rel, S, T, alpha, sigma, net_time, eta=0.75, c=1e-4):
    """Per-example loss of Algorithm 1 in the paper's notation. ``alpha(t)``, ``sigma(t)`` and ``net_time(t)``
    take paper time ``t`` in ``[0, 1]`` (0: data) on the ``1/T`` lattice."""
    losses = []
    for i in range(x.shape[0]):
        t = step[i] / S + n_rel[i] / T
        s = t - 1 / T
        t_step = step[i] / S
        a_t, s_t, a_s, s_s = alpha(t), sigma(t), alpha(s), sigma(s)
        a_e, s_e = alpha(t_step), sigma(t_step)
        z_t = a_t * x[i] + s_t * eps[i]
        x_teacher = f_teacher(z_t[None], net_time(t))[0]
        x_var = eta * (x_teacher - x[i]).square().sum() / D
        # Algorithm 3 (aDDIM)
        eps_hat = (z_t - a_t * x_teacher) / s_t
        z_s_var = (a_s - a_t * s_s / s_t) ** 2 * x_var
        z_s = a_s * x_teacher + torch.sqrt(s_s**2 + D / eps_hat.square().sum() * z_s_var) * eps_hat
        if n_rel[i] == 1:  # s is the segment's end: the reference point is z_s itself
            z_ref = z_s
        else:
            x_ref = f_student(z_s[None], net_time(s))[0]
            z_ref = a_e * x_ref + (s_e / s_s) * (z_s - a_s * x_ref)  # DDIM_{s -> t_step}
        x_hat = f_student(z_t[None], net_time(t))[0]
        inv = (z_ref - (s_e / s_t) * z_t) / (a_e - a_t * s_e / s_t)  # invDDIM_{t -> t_step}
        x_diff = inv - x_hat
        weight = a_t**2 / s_t**2 + 1
        losses.append(weight * (torch.sqrt(x_diff.square().sum() + c * c) - c))
    return torch.stack(losses)


@pytest.mark.parametrize("S,n", [(1, 4), (2, 3), (4, 2)])
def test_mcm_loss_is_algorithm_1_line_by_line(S, n):
    schedule = ContinuousVPSchedule("cosine")
    T = S * n
    grid = TimeUniform().grid(schedule, T, final="zero")  # index j (noise -> data) is paper time 1 - j / T

    def lookup(values):
        return lambda t: values[round((1 - t) * T)]

    # the network gets its time in float32, as fewstep (and diffusers) call networks
    alpha, sigma, net_time = lookup(grid.alpha), lookup(grid.sigma), lookup(grid.t.float())
    f_student, f_teacher = _toy_network(1), _toy_network(2)
    rows = 4 * T
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, D, generator=g, dtype=F64)
    eps = torch.randn(rows, D, generator=g, dtype=F64)
    point = torch.arange(rows) % T  # every fine point, several times
    ours = consistency_loss(ModelDenoiser(f_student, schedule, "sample"), ModelDenoiser(f_teacher, schedule, "sample"),
                            x, grid, S, point, eps)
    # fine index j = k n + r (segment k from the noise end) is the paper's step S - 1 - k, n_rel n - r
    step, n_rel = (S - 1 - point // n).tolist(), (n - point % n).tolist()
    reference = algorithm_1(f_student, f_teacher, x, eps, step, n_rel, S, T, alpha, sigma, net_time)
    assert torch.allclose(ours, reference, rtol=1e-10, atol=0), float(((ours - reference) / reference).abs().max())
    # and it can fail: the paper's eta, or the segment end, changed
    wrong = algorithm_1(f_student, f_teacher, x, eps, step, n_rel, S, T, alpha, sigma, net_time, eta=0.5)
    assert not torch.allclose(ours, wrong, rtol=1e-6, atol=0)
