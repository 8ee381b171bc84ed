"""The class-conditional teacher: labels reach the UNet, are dropped to the null class at the configured
rate, resume is exact, the export carries its classes, and configs that cannot work are refused."""

import gzip
import json
import struct
from types import SimpleNamespace

import pytest
import torch

from fewstep.config import TeacherConfig, from_dict
from fewstep.distill.core import checkpoint_paths
from fewstep.distill.teacher import SIDECAR, class_info, eps_loss, train_teacher
from fewstep.data import FASHION_MNIST_CLASSES

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2, "log_every": 2, "seed": 3,
              "ema_decay": 0.9, "progress": False, "cpu": True},
    "model": {"sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
              "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "num_class_embeds": 11},
    "scheduler": {"num_train_timesteps": 100},
}


@pytest.fixture
def labelled_folder(idx_folder):
    """``idx_folder`` with Fashion-MNIST's label range: example ``i`` is class ``i % 10``."""
    for split, n in [("train", 64), ("t10k", 16)]:
        with gzip.open(idx_folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", n) + bytes(i % 10 for i in range(n)))
    return idx_folder


def tiny_config(folder, output_dir, **top):
    config = {k: dict(v) for k, v in TINY.items()}
    config["train"]["output_dir"] = str(output_dir)
    config["data"] = {"name": "fashion_mnist", "root": str(folder), "size": 8}
    return {**config, **top}


def weights(path):
    saved = torch.load(checkpoint_paths(path)[-1], weights_only=False)
    state = saved["state"]
    return {"step": state["counters"]["step"], "model": state["networks"]["model"], "ema": state["emas"]["model"],
            "recipe": saved["recipe"]}


def test_three_labelled_steps_export_a_pipeline_whose_output_depends_on_the_class(labelled_folder, tmp_path):
    from diffusers import DDPMPipeline

    path = train_teacher(tiny_config(labelled_folder, tmp_path / "run"), max_steps=3)
    assert weights(tmp_path / "run")["step"] == 3
    assert json.loads((path / SIDECAR).read_text()) == {"class_names": list(FASHION_MNIST_CLASSES),
                                                        "null_class_label": 10}
    assert class_info(path)["null_class_label"] == 10
    unet = DDPMPipeline.from_pretrained(path).unet.eval()
    assert unet.config.num_class_embeds == 11
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([50, 50])
    with torch.no_grad():
        out = {c: unet(x, t, class_labels=torch.tensor([c, c])).sample for c in (0, 1, 10)}
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[10])


def test_an_unconditional_export_has_no_sidecar(labelled_folder, tmp_path):
    config = tiny_config(labelled_folder, tmp_path / "run")
    del config["model"]["num_class_embeds"]
    path = train_teacher(config, max_steps=1)
    assert not (path / SIDECAR).exists() and class_info(path) == {}
    assert "label_dropout" not in weights(tmp_path / "run")["recipe"]["settings"]  # old checkpoints still resume


class Spy(torch.nn.Module):
    """A stand-in UNet that records the class labels the loss gives it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, class_labels=None):
        self.seen.append(class_labels)
        return SimpleNamespace(sample=x * self.w)


def _batch(labels):
    """A batch of ``LabelledImages`` as the data loader collates it."""
    from torch.utils.data import default_collate

    from fewstep.distill.teacher import LabelledImages

    data = LabelledImages(torch.zeros(len(labels), 1, 4, 4), labels, [str(i) for i in range(10)])
    return default_collate([data[i] for i in range(len(data))])


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_labels_are_dropped_to_the_null_class_at_the_configured_rate(p):
    labels = torch.arange(2000) % 10
    loss, spy = eps_loss(torch.linspace(0.99, 0.01, 100), null_label=10, label_dropout=p), Spy()
    for seed in range(4):
        loss(spy, _batch(labels), torch.Generator().manual_seed(seed))
    seen = torch.stack(spy.seen)
    dropped = seen == 10
    assert abs(dropped.float().mean().item() - p) < 0.02  # 8000 draws: sd 0.005 at p = 0.3
    assert torch.equal(seen[~dropped], labels.expand_as(seen)[~dropped])  # the others are the data's
    assert not torch.equal(dropped[0], dropped[1])  # drawn afresh per step, from the step's generator
    again = Spy()
    loss(again, _batch(labels), torch.Generator().manual_seed(0))
    assert torch.equal(again.seen[0], seen[0])  # a resumed step drops the same labels


def test_label_dropout_defaults_to_one_tenth_and_is_part_of_the_recipe(labelled_folder, tmp_path):
    train_teacher(tiny_config(labelled_folder, tmp_path / "run"), max_steps=1)
    assert weights(tmp_path / "run")["recipe"]["settings"]["label_dropout"] == 0.1
    with pytest.raises(ValueError, match="different run .*label_dropout: 0.1 -> 0.2"):
        train_teacher(tiny_config(labelled_folder, tmp_path / "run", label_dropout=0.2))


def test_a_resumed_conditional_run_ends_with_the_same_weights(labelled_folder, tmp_path):
    train_teacher(tiny_config(labelled_folder, tmp_path / "straight"))
    train_teacher(tiny_config(labelled_folder, tmp_path / "resumed"), max_steps=3)  # stopped part-way
    train_teacher(tiny_config(labelled_folder, tmp_path / "resumed"))  # picks up the checkpoint
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6
    for part in ["model", "ema"]:
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert not torch.equal(a["model"]["class_embedding.weight"], a["ema"]["class_embedding.weight"])


def test_a_wrong_number_of_class_embeddings_is_refused(labelled_folder, tmp_path):
    config = tiny_config(labelled_folder, tmp_path / "run")
    config["model"]["num_class_embeds"] = 10  # the classes, but no null class
    with pytest.raises(ValueError, match=r"num_class_embeds must be the number of classes \+ 1 = 11 .* got 10"):
        train_teacher(config)


def test_labels_outside_the_classes_are_refused(idx_folder, tmp_path):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\) \(10 classes\), found 10"):
        train_teacher(tiny_config(idx_folder, tmp_path / "run"))  # its labels run 0..63


def test_data_without_labels_is_refused(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"  # a flat folder of images: no conditions
    folder.mkdir()
    for i in range(16):
        Image.new("L", (8, 8), i * 16).save(folder / f"{i}.png")
    config = tiny_config(tmp_path, tmp_path / "run")
    config["data"] = {"name": f"folder:{folder}", "channels": 1}
    with pytest.raises(ValueError, match="needs class labels; data .* has none"):
        train_teacher(config)


@pytest.mark.parametrize("model,top,match", [
    ({"num_class_embeds": None}, {"label_dropout": 0.1}, "label_dropout is for class-conditional teachers"),
    ({}, {"label_dropout": 1.0}, r"label_dropout must lie in \[0, 1\)"),
    ({"num_class_embeds": None, "class_embed_type": "timestep"}, {}, "class_embed_type needs model.num_class_embeds"),
    ({"class_embed_type": "identity"}, {}, "class_embed_type must be null or 'timestep'"),
])
def test_bad_conditioning_configs_are_refused(model, top, match):
    config = {k: dict(v) for k, v in TINY.items()}
    config["model"].update(model)
    with pytest.raises(ValueError, match=match):
        from_dict(TeacherConfig, {**config, **top})


def test_the_committed_config_is_class_conditional():
    from fewstep.config import load

    config = load(TeacherConfig, "configs/teacher_fmnist_classcond.yaml")
    assert config.model.num_class_embeds == len(FASHION_MNIST_CLASSES) + 1 and config.label_dropout == 0.1


def test_the_trained_teacher_loads_offline_with_its_classes():
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained("teachers/fmnist_classcond")
    info = class_info("teachers/fmnist_classcond")
    assert info == {"class_names": list(FASHION_MNIST_CLASSES), "null_class_label": 10}
    assert pipe.unet.config.num_class_embeds == 11 and pipe.unet.config.sample_size == 28
