"""The MR restoration trainer: trains on the core, saves a model that the MR Sampler restores with."""

from pathlib import Path

import pytest
import torch

from fewstep.distill.mr_train import load_mr_model, train_mr
from fewstep.samplers.mr import MRSampler


def tiny_config(tmp_path, idx_folder, **mr):
    return {
        "train": {"output_dir": str(tmp_path / "mr"), "steps": 3, "batch_size": 8, "checkpoint_every": 3,
                  "log_every": 1, "progress": False, "cpu": True},
        "mr": {"T": 20, "noise_std": 0.3, **mr},
        "model": {"sample_size": 8, "in_channels": 2, "out_channels": 1, "layers_per_block": 1,
                  "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
                  "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4},
        "data": {"name": "fashion_mnist", "root": str(idx_folder), "size": 8},
    }


@pytest.mark.parametrize("target", ["noise", "data"])
def test_tiny_mr_model_trains_saves_and_restores(idx_folder, tmp_path, target):
    path = train_mr(tiny_config(tmp_path, idx_folder, target=target))
    denoiser, info = load_mr_model(path)
    assert info["steps"] == 3 and info["T"] == 20 and info["target"] == target
    assert denoiser.prediction_type == target
    mu = torch.zeros(2, 1, 8, 8)
    for method in ["ode", "sde", "euler_maruyama"]:
        out = MRSampler(denoiser, steps=4, method=method).sample(mu, generator=torch.Generator().manual_seed(0))
        assert out.shape == mu.shape and torch.isfinite(out).all()


def test_sigterm_saves_and_the_same_command_resumes(idx_folder, tmp_path, interrupt_and_resume):
    import signal

    import yaml

    config = tiny_config(tmp_path, idx_folder)
    config["train"].update(steps=100_000, checkpoint_every=1)  # would run for an hour: stopped by the signal
    path = tmp_path / "mr.yaml"
    path.write_text(yaml.safe_dump(config))
    run, rerun, saved = interrupt_and_resume("train-mr", path, tmp_path / "mr", signal.SIGTERM)
    assert run.returncode == 143 and f"saved step {saved} " in run.stderr


def test_a_longer_run_replaces_the_export_whole(idx_folder, tmp_path):
    config = tiny_config(tmp_path, idx_folder)
    path = train_mr(config)
    config["train"]["steps"] = 4
    assert train_mr(config) == path and load_mr_model(path)[1]["steps"] == 4
    assert sorted(p.name for p in path.iterdir()) == ["mr.json", "unet"]
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary folder or lock


@pytest.mark.parametrize("mr, message", [({"target": "velocity"}, "unknown MR training target"),
                                         ({"taget": "data"}, "unknown mr option")])
def test_bad_mr_options_fail_clearly(idx_folder, tmp_path, mr, message):
    with pytest.raises(ValueError, match=message):
        train_mr(tiny_config(tmp_path, idx_folder, **mr))


COMMITTED = Path(__file__).resolve().parents[1] / "teachers" / "mr_fmnist"
FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def test_committed_mr_model_loads_offline():
    denoiser, info = load_mr_model(COMMITTED)
    assert info["target"] == "data" and info["T"] == 100 and denoiser.clip == (-1.0, 1.0)
    out = MRSampler(denoiser, steps=3).sample(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 1, 28, 28) and out.abs().max() <= 1


@pytest.mark.skipif(not FMNIST_TEST.exists(), reason="dataset-fashion-mnist not installed")
def test_committed_mr_model_restores_better_than_its_input():
    from fewstep.data import load_images
    from fewstep.distill.mr_train import degrade

    def psnr(x, ref):  # images in [-1, 1], PSNR on [0, 1]
        return float((10 * torch.log10(4 / (x.clamp(-1, 1) - ref).pow(2).flatten(1).mean(1))).mean())

    denoiser, info = load_mr_model(COMMITTED)
    clean = load_images("fashion_mnist", "test", size=28, limit=32)
    mu = degrade(clean, info["noise_std"], torch.Generator().manual_seed(0))
    sde = MRSampler(denoiser, steps=5, method="sde").sample(mu, generator=torch.Generator().manual_seed(0))
    ode = MRSampler(denoiser, steps=10, method="ode").sample(mu, generator=torch.Generator().manual_seed(0))
    assert psnr(sde, clean) > psnr(mu, clean) + 4 and psnr(ode, clean) > psnr(mu, clean) + 1
