"""The training core: exact resume, atomic checkpoints, config validation; the data module; the teacher
export loads into a diffusers pipeline and takes our samplers."""

import subprocess
import sys

import pytest
import torch

from fewstep.config import TrainConfig
from fewstep.config import read_yaml as load_config
from fewstep.data import load_fashion_mnist, load_images, preprocess, read_idx
from fewstep.distill.core import checkpoint_paths
from fewstep.distill.teacher import train_teacher
from fewstep.io import to_uint8

TINY = {
    "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2, "log_every": 2, "seed": 3,
              "ema_decay": 0.9, "progress": False, "cpu": True},
    "model": {"sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
              "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4},
    "scheduler": {"num_train_timesteps": 100},
}


def tiny_config(idx_folder, output_dir):
    config = {k: dict(v) for k, v in TINY.items()}
    config["train"]["output_dir"] = str(output_dir)
    config["data"] = {"name": "fashion_mnist", "root": str(idx_folder), "size": 8}
    return config


def weights(path):
    """The newest checkpoint's step, weights and EMA weights."""
    state = torch.load(checkpoint_paths(path)[-1], weights_only=False)["state"]
    return {"step": state["counters"]["step"], "model": state["networks"]["model"], "ema": state["emas"]["model"]}


def test_resumed_run_ends_with_the_same_weights(idx_folder, tmp_path):
    train_teacher(tiny_config(idx_folder, tmp_path / "straight"))
    train_teacher(tiny_config(idx_folder, tmp_path / "resumed"), max_steps=3)  # stopped part-way
    assert weights(tmp_path / "resumed")["step"] == 3
    train_teacher(tiny_config(idx_folder, tmp_path / "resumed"))  # picks up the checkpoint
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6
    for part in ["model", "ema"]:
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert not torch.equal(a["model"][next(iter(a["model"]))], a["ema"][next(iter(a["ema"]))])


def test_resume_refuses_a_checkpoint_of_a_different_recipe(idx_folder, tmp_path):
    train_teacher(tiny_config(idx_folder, tmp_path / "run"), max_steps=2)
    longer = tiny_config(idx_folder, tmp_path / "run")
    longer["train"]["steps"], longer["train"]["log_every"] = 4, 1  # may change: continues the same run
    train_teacher(longer)
    assert weights(tmp_path / "run")["step"] == 4
    for section, key, value in [("train", "lr", 5e-4), ("model", "block_out_channels", [8, 8]),
                                ("scheduler", "num_train_timesteps", 50)]:
        changed = tiny_config(idx_folder, tmp_path / "run")
        changed["train"]["steps"] = 6
        changed[section][key] = value
        with pytest.raises(ValueError, match=f"different run .*{key}"):
            train_teacher(changed)
    assert weights(tmp_path / "run")["step"] == 4  # nothing was overwritten


def test_exported_teacher_loads_as_a_diffusers_pipeline(idx_folder, tmp_path):
    from diffusers import DDPMPipeline

    from fewstep.samplers.schedulers import FewstepScheduler

    path = train_teacher(tiny_config(idx_folder, tmp_path / "run"))
    pipe = DDPMPipeline.from_pretrained(path)
    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, sampler="dpmpp_2m")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=4, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    assert (tmp_path / "run" / "history.json").exists() and (tmp_path / "run" / "train_info.json").exists()


def test_no_temporary_checkpoint_is_left_behind(idx_folder, tmp_path):
    train_teacher(tiny_config(idx_folder, tmp_path / "run"), max_steps=2)
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_train_teacher_cli_runs_a_tiny_config(idx_folder, tmp_path):
    import yaml

    config = tiny_config(idx_folder, tmp_path / "cli")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "fewstep.cli", "train-teacher", "--config", str(path),
                          "--max-steps", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert weights(tmp_path / "cli")["step"] == 2


@pytest.mark.parametrize("bad,match", [
    ({"train": {"stepz": 3}}, "unknown training option"),
    ({"train": {"steps": 0}}, "steps must be"),
    ({"train": {"batch_size": 1000}}, "batch_size"),
    ({"bogus": {}}, "unknown config section"),
    ({"train": {"ema_decay": 1.5}}, "ema_decay"),
    ({"scheduler": {"prediction_type": "sample"}}, "prediction_type"),
    ({"data": {"name": "imagenet"}}, "unknown data set"),
    ({"data": {"name": "fashion_mnist", "size": 16}}, "does not fit"),
])
def test_bad_configs_raise_clear_errors(bad, match, idx_folder, tmp_path):
    config = tiny_config(idx_folder, tmp_path / "bad")
    for section, values in bad.items():
        config.setdefault(section, {}).update(values)
        if section == "data" and "root" not in values and values.get("name") == "fashion_mnist":
            config["data"]["root"] = str(idx_folder)
    with pytest.raises(ValueError, match=match):
        train_teacher(config)


def test_config_file_is_valid():
    config = load_config("configs/teacher_fmnist.yaml")
    assert TrainConfig.from_dict(config["train"]).steps > 0


# -- data ----------------------------------------------------------------------------------------


def test_idx_reader_and_fashion_mnist_loader(idx_folder):
    images, labels = load_fashion_mnist("train", idx_folder, labels=True)
    assert images.shape == (64, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == list(range(64))
    assert torch.equal(read_idx(idx_folder / "t10k-images-idx3-ubyte.gz"), load_fashion_mnist("test", idx_folder))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", idx_folder / "missing")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid", idx_folder)


def test_preprocess_maps_pixels_to_minus_one_one_and_back():
    pixels = torch.tensor([[[0, 128, 255]]], dtype=torch.uint8)
    x = preprocess(pixels)
    assert x.shape == (1, 1, 1, 3) and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), pixels[:, None])
    assert preprocess(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), size=32, channels=3).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="shape"):
        preprocess(torch.zeros(28, 28))


def test_image_folder_source(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (10, 10), (i * 100, 0, 255)).save(tmp_path / f"{i}.png")
    x = load_images(f"folder:{tmp_path}", size=8)
    assert x.shape == (3, 3, 8, 8) and x[0, 2].mean() == pytest.approx(1.0)


@pytest.mark.skipif(not (load_fashion_mnist.__defaults__ and __import__("pathlib").Path(
    "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists()), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_when_installed():
    x = load_images("fashion_mnist", "test", size=28)
    assert x.shape == (10000, 1, 28, 28) and -1 <= x.min() < x.max() <= 1


def test_committed_teacher_loads_offline_and_swaps_samplers():
    from diffusers import DDPMPipeline

    from fewstep.samplers.schedulers import FewstepScheduler

    pipe = DDPMPipeline.from_pretrained("teachers/fmnist")
    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, sampler="dpmpp_2m")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 28, 28, 1) and 0 <= images.min() and images.max() <= 1
