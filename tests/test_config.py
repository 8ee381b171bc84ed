"""The one config system (fewstep.config) and the training subcommands built on it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fewstep import cli
from fewstep.config import (MRTrainConfig, TeacherConfig, TrainConfig, from_dict, help_text, load, option,
                            section)


def yaml_file(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# The loader


def test_yaml_5e_minus_4_becomes_a_float(tmp_path):
    # PyYAML reads `5e-4` (no dot) as the string "5e-4"; the field says float.
    config = load(TeacherConfig, yaml_file(tmp_path, "train:\n  lr: 5e-4\n  steps: 1e3\n"))
    assert config.train.lr == 5e-4 and isinstance(config.train.lr, float)
    assert config.train.steps == 1000 and isinstance(config.train.steps, int)


def test_dotted_overrides_are_applied_over_the_file_and_typed(tmp_path):
    path = yaml_file(tmp_path, "train:\n  lr: 0.1\n  steps: 10\nmodel:\n  layers_per_block: 1\n")
    config = load(TeacherConfig, path, ["train.lr=1e-4", "model.layers_per_block=2", "train.cpu=true",
                                        "train.mixed_precision=no", "model.block_out_channels=[8, 16]"])
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    assert config.model.layers_per_block == 2 and config.train.steps == 10  # the file's other keys stay
    assert config.train.cpu is True
    assert config.train.mixed_precision == "no"  # a string field takes the text, not YAML's False
    assert config.model.block_out_channels == (8, 16)


def test_defaults_fill_what_the_file_leaves_out(tmp_path):
    config = load(MRTrainConfig, yaml_file(tmp_path, "mr:\n  T: 20\n"))
    assert config.mr.T == 20 and config.mr.noise_std == 0.3 and config.train == TrainConfig()


@pytest.mark.parametrize("text, message", [
    ("bogus: {}\n", "unknown config section(s) ['bogus']; known: ['data', 'eval', 'flow', 'label_dropout', 'model', 'objective', 'scheduler', 'train']"),
    ("train:\n  stepz: 3\n", "unknown training option(s) ['stepz']; known: ['batch_size', "),
    ("mr:\n  taget: data\n", "unknown mr option(s) ['taget']; known: ['T', 'noise_std', 'sigma_inf', 'target']"),
])
def test_unknown_keys_are_rejected_with_the_known_ones(tmp_path, text, message):
    with pytest.raises(ValueError) as err:
        load(MRTrainConfig if "mr" in text else TeacherConfig, yaml_file(tmp_path, text))
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("bogus.lr=1", "unknown config section(s) ['bogus']; known: ["),
    ("train.stepz=3", "unknown training option(s) ['stepz']; known: ["),
    ("train.lr", "expected KEY=VALUE"),
])
def test_unknown_override_keys_are_rejected(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load(TeacherConfig, None, [override])


@pytest.mark.parametrize("values, message", [
    ({"train": {"lr": "fast"}}, "train.lr: expected float, got 'fast'"),
    ({"train": {"steps": 2.5}}, "train.steps: expected int, got 2.5"),
    ({"train": {"cpu": "maybe"}}, "train.cpu: expected bool, got 'maybe'"),
    ({"model": {"block_out_channels": [8, "x"]}}, "model.block_out_channels[1]: expected int, got 'x'"),
    ({"train": 3}, "train: expected a mapping"),
])
def test_a_bad_value_names_its_key_and_the_type_it_wants(values, message):
    with pytest.raises(ValueError) as err:
        from_dict(TeacherConfig, values)
    assert message in str(err.value)


@dataclass
class Inner:
    width: int = option(4, "channels")


@dataclass
class Job:
    inner: Inner = section(Inner)
    rate: float = option(0.5, "a rate")


def test_a_new_config_is_one_dataclass():
    job = load(Job, None, ["inner.width=8", "rate=1e-2"])
    assert job.inner.width == 8 and job.rate == 0.01
    text = help_text(Job)
    assert "inner.width = 4" in text and "channels" in text and "rate = 0.5" in text


# ---------------------------------------------------------------------------------------------
# The command line


TRAINING = ["train-teacher", "train-mr", "train-classifier"]
NEW = ["grid", *TRAINING]


def test_every_new_subcommand_is_listed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in NEW:
        assert name in out


@pytest.mark.parametrize("name", NEW)
def test_help_of_each_new_subcommand_runs(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: fewstep {name}" in capsys.readouterr().out


def test_training_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train-teacher", "--help"])
    out = capsys.readouterr().out
    assert "train.lr = 0.0002" in out and "AdamW learning rate" in out
    assert "train.cpu = false" in out and "data.name = 'fashion_mnist'" in out
    for key in ("train.steps", "train.ema_decay", "model.layers_per_block", "scheduler.prediction_type"):
        assert key in out


def test_a_bad_override_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train-mr", "--config", "configs/mr_fmnist.yaml", "train.lr=fast"])
    assert exit_info.value.code == 2
    assert "train.lr: expected float" in capsys.readouterr().err


def test_training_commands_receive_the_typed_config(monkeypatch):
    import fewstep.distill.mr_train as mr_train

    seen = {}
    monkeypatch.setattr(mr_train, "cli", lambda config, max_steps=None: seen.update(c=config, m=max_steps) or 0)
    assert cli.main(["train-mr", "--config", "configs/mr_fmnist.yaml", "train.steps=7", "mr.T=50",
                     "--max-steps", "2"]) == 0
    config = seen["c"]
    assert isinstance(config, MRTrainConfig) and config.train.steps == 7 and config.mr.T == 50
    assert config.train.lr == 0.0005 and config.model.in_channels == 2 and seen["m"] == 2


@pytest.mark.parametrize("path", ["configs/teacher_fmnist.yaml", "configs/mr_fmnist.yaml"])
def test_committed_training_configs_load(path):
    config = load(TeacherConfig if "teacher" in path else MRTrainConfig, path)
    assert config.train.steps > 0 and config.model.sample_size == 28
