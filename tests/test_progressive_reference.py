"""Progressive distillation against its reference code (issue 24), float64: google-research
``diffusion_distillation/diffusion_distillation/dpm.py`` (``Model._run_model``, ``Model.training_losses``)
and ``model.py`` (the student is the teacher's parameters under the one ``mean_type`` of the config).

The reference's formulas are written out here in torch, line for line, and computed beside fewstep's on
the same network, inputs and noise, for every ``mean_type`` (eps, x, v, both) and every
``mean_loss_weight_type`` (constant, snr, snr_trunc, v_mse). Its discrete time ``u = (i + 1) / N`` with
``i = 0`` the last step to data is fewstep's student step ``N - 1 - i`` on the same points.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.functional import softplus

from fewstep.config import DistillConfig, from_dict
from fewstep.distill.core import CoreConfig, OptimizerConfig, fit
from fewstep.distill.progressive import BothDenoiser, ProgressiveDistillation, progressive_loss
from fewstep.samplers import ContinuousVPSchedule, ModelDenoiser
from fewstep.samplers.timesteps import TimeUniform

F64 = torch.float64
SCHEDULE = ContinuousVPSchedule("cosine")
MEAN_TYPES = {"eps": "epsilon", "x": "sample", "v": "v_prediction", "both": "both"}  # reference -> fewstep
WEIGHTS = {"constant": "constant", "snr": "snr", "snr_trunc": "truncated_snr", "v_mse": "snr_plus_one"}


# ---------------------------------------------------------------------------------------------
# The reference, transcribed (dpm.py; VP: alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr))


def _bc(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def ref_predict_x_from_eps(z, eps, logsnr):
    logsnr = _bc(logsnr, z)
    return torch.sqrt(1. + torch.exp(-logsnr)) * (z - eps * torch.rsqrt(1. + torch.exp(logsnr)))


def ref_predict_eps_from_x(z, x, logsnr):
    logsnr = _bc(logsnr, z)
    return torch.sqrt(1. + torch.exp(logsnr)) * (z - x * torch.rsqrt(1. + torch.exp(-logsnr)))


def ref_predict_x_from_v(z, v, logsnr):
    logsnr = _bc(logsnr, z)
    return torch.sqrt(torch.sigmoid(logsnr)) * z - torch.sqrt(torch.sigmoid(-logsnr)) * v


def ref_predict_v_from_x_and_eps(x, eps, logsnr):
    logsnr = _bc(logsnr, x)
    return torch.sqrt(torch.sigmoid(logsnr)) * eps - torch.sqrt(torch.sigmoid(-logsnr)) * x


def ref_run_model(model_output, z, logsnr, mean_type):
    """``Model._run_model`` (clip_x=False) on a given network output."""
    if mean_type == "both":
        _x, _eps = model_output.chunk(2, dim=1)  # the reference splits its last (channel) axis: x, then eps
        wx = _bc(torch.sigmoid(-logsnr), z)
        model_x = wx * _x + (1. - wx) * ref_predict_x_from_eps(z, _eps, logsnr)
    elif mean_type == "eps":
        model_eps = model_output
        model_x = ref_predict_x_from_eps(z, model_eps, logsnr)
    elif mean_type == "v":
        model_v = model_output
        model_x = ref_predict_x_from_v(z, model_v, logsnr)
    else:
        model_x = model_output
    if mean_type != "eps":
        model_eps = ref_predict_eps_from_x(z, model_x, logsnr)
    if mean_type != "v":
        model_v = ref_predict_v_from_x_and_eps(model_x, model_eps, logsnr)
    return {"model_x": model_x, "model_eps": model_eps, "model_v": model_v}


def ref_distillation_loss(model_fn, target_model_fn, mean_type, weight_type, x, eps, i, points):
    """``Model.training_losses`` with a teacher (``target_model_fn``): ``points`` gives each example's
    ``(t, logsnr)`` at ``u``, ``u - 0.5/N`` and ``u - 1/N`` (the network is called with ``t``)."""
    (t, logsnr), (t_mid, logsnr_mid), (_, logsnr_s) = points
    bc = lambda v: _bc(v, x)  # noqa: E731
    z = bc(torch.sqrt(torch.sigmoid(logsnr))) * x + bc(torch.sqrt(torch.sigmoid(-logsnr))) * eps
    out = ref_run_model(target_model_fn(z, t), z, logsnr, mean_type)
    a_mid, stdv_mid = bc(torch.sqrt(torch.sigmoid(logsnr_mid))), bc(torch.sqrt(torch.sigmoid(-logsnr_mid)))
    z_mid = a_mid * out["model_x"] + stdv_mid * out["model_eps"]
    out = ref_run_model(target_model_fn(z_mid, t_mid), z_mid, logsnr_mid, mean_type)
    x_pred, eps_pred = out["model_x"], out["model_eps"]
    a_s, stdv_s = bc(torch.sqrt(torch.sigmoid(logsnr_s))), bc(torch.sqrt(torch.sigmoid(-logsnr_s)))
    z_teacher = a_s * x_pred + stdv_s * eps_pred
    a_t = bc(torch.sqrt(torch.sigmoid(logsnr)))
    stdv_frac = bc(torch.exp(0.5 * (softplus(logsnr) - softplus(logsnr_s))))
    x_target = (z_teacher - stdv_frac * z) / (a_s - stdv_frac * a_t)
    x_target = torch.where(bc(i == 0), x_pred, x_target)
    eps_target = ref_predict_eps_from_x(z, x_target, logsnr)
    v_target = ref_predict_v_from_x_and_eps(x_target, eps_target, logsnr)
    model = ref_run_model(model_fn(z, t), z, logsnr, mean_type)
    x_mse = (model["model_x"] - x_target).square().flatten(1).mean(1)
    eps_mse = (model["model_eps"] - eps_target).square().flatten(1).mean(1)
    v_mse = (model["model_v"] - v_target).square().flatten(1).mean(1)
    return {"constant": x_mse, "snr": eps_mse, "snr_trunc": torch.maximum(x_mse, eps_mse), "v_mse": v_mse}[weight_type]


# ---------------------------------------------------------------------------------------------
# One network, one grid, one batch for both


class Toy(nn.Module):
    """A (float64) network ``(z, t) -> out_channels`` maps (a 3x3 convolution modulated by ``t``)."""

    def __init__(self, channels: int = 2, out_channels: int = 2, seed: int = 0, dtype=F64):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1, dtype=dtype)
        self.bias = nn.Parameter(torch.randn(out_channels, 1, 1, dtype=dtype))

    def forward(self, z, t):
        t = t.to(z.dtype).reshape(-1, 1, 1, 1)
        return 0.5 * self.conv(z) * (1 + t) + torch.sin(3 * t) * self.bias


def _grid(n_teacher: int = 8):
    return TimeUniform().grid(SCHEDULE, n_teacher, final="zero")


def _batch(n: int, rows: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2, 4, 4, generator=g, dtype=F64)
    noise = torch.randn(rows, 2, 4, 4, generator=g, dtype=F64)
    index = torch.arange(rows) % n  # every student step, the last one (to data) included
    return x, noise, index


def _reference_points(grid, index):
    """Each example's (t, logsnr) at the student step's start, the teacher's midpoint and its end;
    ``t`` as the network sees it (``ModelDenoiser`` hands networks float32 time)."""
    lam = 2 * grid.log_snr  # log(alpha^2 / sigma^2); +inf at clean data
    return [(grid.t[k].float(), lam[k]) for k in (2 * index, 2 * index + 1, 2 * index + 2)]


def _denoiser(net, mean_type):
    return BothDenoiser(net, SCHEDULE) if mean_type == "both" else ModelDenoiser(net, SCHEDULE, MEAN_TYPES[mean_type])


@pytest.mark.parametrize("weight_type", sorted(WEIGHTS))
@pytest.mark.parametrize("mean_type", sorted(MEAN_TYPES))
def test_pd_loss_is_the_references_for_every_mean_type_and_weighting(mean_type, weight_type):
    out = 4 if mean_type == "both" else 2
    teacher, student = Toy(out_channels=out, seed=0), Toy(out_channels=out, seed=1)
    grid, n = _grid(8), 4
    x, noise, index = _batch(n)
    ours = progressive_loss(_denoiser(student, mean_type), _denoiser(teacher, mean_type), x, grid, index, noise,
                            WEIGHTS[weight_type])
    theirs = ref_distillation_loss(student, teacher, mean_type, weight_type, x, noise, n - 1 - index,
                                   _reference_points(grid, index))
    assert theirs.dtype == ours.dtype == F64 and torch.isfinite(theirs).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def test_both_reconciles_x_and_eps_heads_by_the_snr_weighting():
    """``x0 = sigma^2 x_out + alpha (z - sigma eps_out)`` (VP): the x head alone at pure noise (alpha = 0,
    where the eps head says nothing about x), the eps head's estimate alone at clean data."""
    from fewstep.distill.progressive import both_x0

    g = torch.Generator().manual_seed(0)
    x_out, eps_out, z = (torch.randn(3, 1, 4, 4, generator=g, dtype=F64) for _ in range(3))
    alpha = torch.tensor([0.0, 0.6, 1.0], dtype=F64)
    sigma = (1 - alpha**2).sqrt()
    got = both_x0(x_out, eps_out, z, alpha, sigma)
    assert torch.equal(got[0], x_out[0]) and torch.equal(got[2], z[2])
    torch.testing.assert_close(got[1], 0.64 * x_out[1] + 0.6 * (z[1] - 0.8 * eps_out[1]), rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# The start: the reference's student is its teacher (one mean_type, the teacher's parameters)


@pytest.mark.parametrize("mean_type", sorted(MEAN_TYPES))
def test_a_teacher_parameterised_student_starts_as_the_reference_does(mean_type):
    out = 4 if mean_type == "both" else 2
    teacher = Toy(out_channels=out, seed=0)
    method = ProgressiveDistillation(teacher, MEAN_TYPES[mean_type], SCHEDULE, start_steps=8, end_steps=4,
                                     prediction_type="teacher", timesteps=TimeUniform())
    assert method.prediction_type == MEAN_TYPES[mean_type] and method.starts_as_teacher
    grid, n = method.teacher_grid(0), 4
    x, noise, index = _batch(n, seed=1)
    ours = method.loss(x, index, noise)
    theirs = ref_distillation_loss(teacher, teacher, mean_type, "snr_trunc", x, noise, n - 1 - index,
                                   _reference_points(grid, index))
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    z = x + noise
    t = grid.t[2 * index]
    assert torch.equal(_denoiser(method.student, mean_type)(z, t).x0, _denoiser(teacher, mean_type)(z, t).x0)


def test_a_student_of_another_parameterisation_does_not_start_as_its_teacher():
    """Today's default on an eps teacher: the teacher's weights read as v are another function."""
    teacher = Toy(seed=0)
    method = ProgressiveDistillation(teacher, "epsilon", SCHEDULE, start_steps=8, end_steps=1,
                                     timesteps=TimeUniform())
    assert method.prediction_type == "v_prediction" and not method.starts_as_teacher
    assert method.recipe()["starts_as_teacher"] is False and method.student_info()["starts_as_teacher"] is False
    x, noise, index = _batch(4, seed=2)
    matched = ProgressiveDistillation(teacher, "epsilon", SCHEDULE, start_steps=8, end_steps=4,
                                      prediction_type="teacher", timesteps=TimeUniform())
    assert method.loss(x, index, noise).mean() > 10 * matched.loss(x, index, noise).mean()


def test_a_both_student_needs_a_two_headed_network_and_eps_stops_at_four_steps():
    with pytest.raises(ValueError, match="two heads"):
        ProgressiveDistillation(Toy(), "epsilon", SCHEDULE, start_steps=8, end_steps=1, prediction_type="both")
    with pytest.raises(ValueError, match="eps-parameterised student cannot be distilled to 2"):
        ProgressiveDistillation(Toy(), "epsilon", SCHEDULE, start_steps=8, end_steps=2, prediction_type="teacher")
    method = ProgressiveDistillation(Toy(), "epsilon", SCHEDULE, start_steps=8, end_steps=1, prediction_type="both",
                                     student=Toy(out_channels=4), timesteps=TimeUniform())
    x, noise, index = _batch(4)
    assert torch.isfinite(method.loss(x, index, noise)).all()


# ---------------------------------------------------------------------------------------------
# Rounds with an EMA: the reference (and OpenAI's PD) start each round from one network


def _ema_run(tmp_path, ema_decay):
    exported = {}
    # float32: the core keeps frozen networks (the teacher) in float32
    method = ProgressiveDistillation(Toy(seed=0, dtype=torch.float32), "v_prediction", SCHEDULE, start_steps=4,
                                     end_steps=1,
                                     timesteps=TimeUniform(),
                                     optim=OptimizerConfig(lr=1e-2, anneal="constant", ema_decay=ema_decay),
                                     on_student=lambda steps, module, grid, state: exported.update(
                                         {steps: copy.deepcopy(module.state_dict())}))
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 2, 4, 4, generator=g))
    config = CoreConfig(output_dir=str(tmp_path), steps=6, batch_size=8, checkpoint_every=6, log_every=6,
                        progress=False, cpu=True)
    state = fit(method, config, data, max_steps=3, log=lambda *_: None).state  # round 0 (3 steps), round 1 not begun
    assert (state.round, state.step_in_round) == (1, 0)
    return method, state, exported


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_with_an_ema_a_round_starts_with_teacher_student_and_ema_all_the_previous_ema(tmp_path):
    method, state, exported = _ema_run(tmp_path, ema_decay=0.9)
    ema, raw = _weights(state.ema("student")), _weights(state.unwrapped("student"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # an EMA that differs from the raw student
    method.begin_round(1, state)
    for name, module in (("teacher", state.unwrapped("previous")), ("student", state.unwrapped("student")),
                         ("ema", state.ema("student")), ("exported", None)):
        weights = exported[2] if module is None else module.state_dict()
        for k in ema:
            assert torch.equal(weights[k], ema[k]), (name, k)
    assert method.recipe()["round_start"] == "teacher_and_student_from_ema"


def test_without_an_ema_the_student_continues_and_becomes_the_teacher(tmp_path):
    method, state, _ = _ema_run(tmp_path, ema_decay=None)
    raw = _weights(state.unwrapped("student"))
    method.begin_round(1, state)
    for module in (state.unwrapped("previous"), state.unwrapped("student")):
        assert all(torch.equal(module.state_dict()[k], raw[k]) for k in raw)
    assert method.recipe()["round_start"] == "teacher_from_student"


# ---------------------------------------------------------------------------------------------
# The config: what can be exported


def test_the_config_refuses_a_both_student_in_one_line_and_knows_teacher():
    with pytest.raises(ValueError, match="both .*cannot be exported"):
        from_dict(DistillConfig, {"progressive": {"prediction_type": "both"}})
    with pytest.raises(ValueError, match="must be one of"):
        from_dict(DistillConfig, {"progressive": {"prediction_type": "v"}})
    config = from_dict(DistillConfig, {"progressive": {"prediction_type": "teacher"}})
    assert config.progressive.prediction_type == "teacher"


def test_a_teacher_parameterised_student_is_exported_with_the_teachers_type(tmp_path, idx_folder):
    import json

    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from fewstep.distill.run import distill

    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=64)).save_pretrained(teacher)
    config = from_dict(DistillConfig, {
        "teacher": str(teacher), "progressive": {"start_steps": 8, "end_steps": 4, "prediction_type": "teacher"},
        "train": {"output_dir": str(tmp_path / "pd"), "steps": 2, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2,
                  "log_every": 1, "progress": False, "cpu": True, "ema_decay": 0.0},
        "data": {"name": "fashion_mnist", "root": str(idx_folder), "size": 8}})
    (path,) = distill(config)
    record = json.loads((path / "fewstep_student.json").read_text())
    assert record["prediction_type"] == "epsilon" and record["starts_as_teacher"] is True
    assert json.loads((path / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
