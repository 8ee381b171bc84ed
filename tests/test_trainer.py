"""The training core: exact resume, atomic checkpoints, config validation; the data module; the teacher
export loads into a diffusers pipeline and takes our samplers."""

import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("path", ["configs/teacher_fmnist.yaml", "configs/mr_fmnist.yaml"])
def test_the_committed_train_sections_map_onto_the_core(path):
    from fewstep.distill.core import from_train_config

    train = TrainConfig.from_dict({**load_config(path)["train"], "gradient_accumulation_steps": 2})
    core, optim = from_train_config(train)
    assert (core.output_dir, core.steps, core.batch_size, core.accumulation, core.seed) == (
        train.output_dir, train.steps, 64, 2, 0)
    assert (core.checkpoint_every, core.keep_checkpoints, core.log_every) == (train.checkpoint_every, 3, 25)
    assert (optim.lr, optim.warmup_steps, optim.ema_decay, optim.ema_start, optim.grad_clip, optim.weight_decay,
            optim.anneal) == (0.0005, 100, 0.995, 200, 1.0, 0.0, "constant")


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


# -- work is never lost (issue 14): signals, unwritable or busy folders, full disks, atomic exports ----------


def _yaml(tmp_path, config, name="tiny.yaml"):
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_sigint_saves_says_so_in_one_line_and_the_same_command_resumes(idx_folder, tmp_path, interrupt_and_resume):
    import signal

    config = tiny_config(idx_folder, tmp_path / "run")
    config["train"].update(steps=100_000, checkpoint_every=1)  # would run for an hour: stopped by the signal
    run, rerun, saved = interrupt_and_resume("train-teacher", _yaml(tmp_path, config), tmp_path / "run", signal.SIGINT)
    assert run.returncode == 130
    assert f"saved step {saved} " in run.stderr and "run the same command again to resume" in run.stderr
    assert f"resuming {tmp_path / 'run'} at step {saved} " in rerun.stdout


def test_a_run_refused_by_its_checkpoint_says_why_in_one_line(idx_folder, tmp_path, capsys):
    from fewstep import cli

    config = tiny_config(idx_folder, tmp_path / "run")
    config["train"]["steps"] = 2
    path = _yaml(tmp_path, config)
    assert cli.main(["train-teacher", "--config", str(path)]) == 0
    capsys.readouterr()
    for override, message in [("train.steps=1", "is at step 2, past the configured steps 1"),
                              ("train.lr=0.5", "was written by a different run (optimizers.model.lr: 0.001 -> 0.5)")]:
        assert cli.main(["train-teacher", "--config", str(path), override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fewstep train-teacher: error: ") and message in err[0], err
    assert weights(tmp_path / "run")["step"] == 2


def _without_data(idx_folder, output_dir):
    config = tiny_config(idx_folder, output_dir)
    config["data"]["root"] = str(idx_folder / "not-there")  # loading the data would fail (FileNotFoundError)
    return config


@pytest.mark.parametrize("how", ["read-only folder", "a file in the way"])
def test_an_unwritable_output_folder_fails_before_the_data_loads(idx_folder, tmp_path, how):
    from fewstep.distill.core import NotWritable

    if how == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders")
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o500)
    else:
        parent = tmp_path / "file"
        parent.write_text("")
    try:
        with pytest.raises(NotWritable, match="cannot write to the output folder"):
            train_teacher(_without_data(idx_folder, parent / "out"))
    finally:
        parent.chmod(0o700)


def test_a_second_run_on_the_same_folder_is_refused_before_the_data_loads(idx_folder, tmp_path, capsys):
    from fewstep import cli
    from fewstep.distill.core import FolderInUse, RunLock

    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):  # the first run
        with pytest.raises(FolderInUse, match="in use by another run"):
            train_teacher(_without_data(idx_folder, out))
        assert cli.main(["train-teacher", "--config", str(_yaml(tmp_path, _without_data(idx_folder, out)))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another run" in err[0], err


def _disk_full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_says_no_space_left_and_leaves_no_temporary_file(idx_folder, tmp_path, monkeypatch, capsys):
    from fewstep import cli

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        _disk_full()

    monkeypatch.setattr(torch, "save", torn_save)
    path = _yaml(tmp_path, tiny_config(idx_folder, tmp_path / "run"))
    assert cli.main(["train-teacher", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device for" in err[0] and "checkpoint-00000002.pt" in err[0], err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no checkpoint, torn or whole; no lock


def test_a_failed_export_leaves_the_previous_one_whole(idx_folder, tmp_path, monkeypatch):
    from diffusers import DDPMPipeline

    from fewstep.io import NoSpaceLeft

    config = tiny_config(idx_folder, tmp_path / "run")
    config["train"]["steps"] = 2
    path = train_teacher(config)
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def torn_export(self, folder, *args, **kwargs):
        (Path(folder) / "model_index.json").write_text("{")  # half written, then the disk is full
        _disk_full()

    monkeypatch.setattr(DDPMPipeline, "save_pretrained", torn_export)
    config["train"]["steps"] = 4
    with pytest.raises(NoSpaceLeft, match="no space left on the device for .*pipeline"):
        train_teacher(config)
    assert {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in path.parent.iterdir() if "pipeline" in p.name) == ["pipeline"]
    monkeypatch.undo()
    train_teacher(config)  # the checkpoint at step 4 was kept: this only exports
    assert weights(tmp_path / "run")["step"] == 4 and DDPMPipeline.from_pretrained(path).unet is not None
    assert {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()} != before


def test_atomic_dir_replaces_an_older_folder_only_once_the_new_one_is_complete(tmp_path):
    from fewstep.io import NoSpaceLeft, atomic_dir

    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "old"  # readers still see the complete old export
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/new.txt"]
    for error, raised in [(RuntimeError("bug"), RuntimeError), (KeyboardInterrupt(), KeyboardInterrupt),
                          (OSError(28, "No space left on device"), NoSpaceLeft)]:
        with pytest.raises(raised):
            with atomic_dir(target) as tmp:
                (tmp / "partial.txt").write_text("half")
                raise error
        assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/new.txt"]
        assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary sibling left
    with atomic_dir(tmp_path / "new" / "export") as tmp:  # a new folder, its parent made
        (tmp / "a").write_text("a")
    assert (tmp_path / "new" / "export" / "a").read_text() == "a"


def test_atomic_write_says_no_space_left_and_leaves_no_temporary_file(tmp_path):
    from fewstep.io import NoSpaceLeft, atomic_write, atomic_write_bytes

    atomic_write_bytes(tmp_path / "f.bin", b"whole")

    def write(f):
        f.write(b"half")
        _disk_full()

    with pytest.raises(NoSpaceLeft, match=f"no space left on the device for {tmp_path / 'f.bin'}"):
        atomic_write(tmp_path / "f.bin", write)
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"] and (tmp_path / "f.bin").read_bytes() == b"whole"
