"""Prediction.combine (the DDIM / Euler step): c_x0 x0 + c_eps eps without building the half not predicted."""

import pytest
import torch

from fewstep.samplers.denoisers import Prediction, convert_prediction


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction", "flow_prediction"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_combine_equals_the_explicit_sum(kind, per_sample):
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.6, 0.8], dtype=torch.float64) if per_sample else torch.tensor(0.6, dtype=torch.float64)
    alpha, sigma = 1 - t, t  # a flow path (any alpha, sigma serve the other kinds)
    derivs = {"alpha_dot": -torch.ones_like(t), "sigma_dot": torch.ones_like(t)} if kind == "flow_prediction" else {}
    pred = convert_prediction(out, x, alpha, sigma, kind, **derivs)
    expected = 0.7 * pred.x0 + 0.2 * pred.eps  # reads both halves (and caches them) ...
    fresh = convert_prediction(out, x, alpha, sigma, kind, **derivs)  # ... so combine runs on a fresh one
    torch.testing.assert_close(fresh.combine(0.7, 0.2), expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(pred.combine(0.7, 0.2), expected, rtol=0, atol=1e-13)


def test_combine_with_both_given():
    x0, eps = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(Prediction(x0, eps).combine(0.5, 0.25), torch.full((2, 3), 1.0))
