"""A rectified-flow teacher from ``fewstep train-teacher`` (``objective: flow``): its loss is conditional flow
matching's, its times follow the configured law, the export is a DDPMPipeline that diffusers samples, and the
trainers read it as a flow teacher."""

import pytest
import torch

from fewstep.config import TeacherConfig, from_dict
from fewstep.distill.teacher import draw_flow_times, flow_loss, train_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "train": {"steps": 3, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1, "seed": 3,
              "ema_decay": 0.9, "progress": False, "cpu": True},
    "objective": "flow",
    "model": {"sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
              "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4},
    "flow": {"shift": 3.0},
}


class _Recorder(torch.nn.Module):
    """A network that returns a fixed velocity and records what it was called with."""

    def __init__(self, out):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x, t):
        self.calls.append((x, t))
        return type("Out", (), {"sample": self.out})()


def test_the_loss_is_flow_matching_on_the_straight_path():
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    u = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    net = _Recorder(u)
    loss = flow_loss(1000)(net, x0, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)  # the loss's own draws, in its order: t, then eps
    t = draw_flow_times(4, g)
    eps = torch.randn(x0.shape, generator=g)
    (x_t, t_model), = net.calls
    tt = t.view(-1, 1, 1, 1).float()
    torch.testing.assert_close(x_t, (1 - tt) * x0 + tt * eps)
    torch.testing.assert_close(t_model, (1000 * t).float())  # diffusers' flow schedulers call at N sigma
    assert float(loss) == pytest.approx(float((u - (eps - x0)).square().mean()), rel=1e-6)


def test_logit_normal_times_are_sd3s():
    t = draw_flow_times(50000, torch.Generator().manual_seed(0), "logit_normal", 0.0, 1.0)
    n = torch.log(t) - torch.log1p(-t)
    assert abs(float(n.mean())) < 0.02 and abs(float(n.std()) - 1) < 0.02
    with pytest.raises(ValueError, match="uniform.*logit_normal"):
        from_dict(TeacherConfig, {**TINY, "flow": {"time_sampling": "cosine"}})
    with pytest.raises(ValueError, match="takes the flow section, not scheduler"):
        from_dict(TeacherConfig, {**TINY, "scheduler": {"num_train_timesteps": 100}})


def test_a_flow_teacher_exports_a_pipeline_diffusers_samples_and_the_trainers_read(idx_folder, tmp_path):
    from diffusers import DDPMPipeline

    from fewstep.distill.families import load_teacher

    config = {**TINY, "train": {**TINY["train"], "output_dir": str(tmp_path / "run")},
              "data": {"name": "fashion_mnist", "root": str(idx_folder), "size": 8}}
    path = train_teacher(from_dict(TeacherConfig, config))
    pipe = DDPMPipeline.from_pretrained(path)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    family = load_teacher(path)
    assert (family.noise.kind, family.noise.shift, family.prediction_type) == ("flow", 3.0, "flow_prediction")
    # resuming with another objective, or another time law, is refused (the recipe holds them)
    with pytest.raises(ValueError, match="flow"):
        train_teacher(from_dict(TeacherConfig, {**config, "train": {**config["train"], "steps": 4},
                                                "flow": {"shift": 3.0, "time_sampling": "logit_normal"}}))
