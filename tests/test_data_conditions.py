"""Images with their conditions, in the layouts users have them: captions in metadata.jsonl, a folder per
class, IDX labels; and prompt files for the data-free methods."""

from __future__ import annotations

import gzip
import json
import struct

import pytest
import torch

from fewstep.config import DataConfig, given
from fewstep.data import FASHION_MNIST_CLASSES, ConditionedImages, load_conditioned, load_images, load_prompts


def png(path, value: int) -> None:
    """A 4x4 gray PNG whose every pixel is ``value``, so a test can tell which image landed where."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), value).save(path)


def pixel(images: torch.Tensor) -> list[int]:
    """Each image's gray value back in 0..255 (undoing ``preprocess``)."""
    return [round((v + 1) * 127.5) for v in images[:, 0, 0, 0].tolist()]


def metadata(folder, rows) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def captioned(tmp_path):
    """Three images listed out of file order, one in a subfolder."""
    png(tmp_path / "b.png", 20)
    png(tmp_path / "a.png", 10)
    png(tmp_path / "sub" / "c.png", 30)
    metadata(tmp_path, [{"file_name": "b.png", "text": "bee"}, {"file_name": "sub/c.png", "text": "sea"},
                        {"file_name": "a.png", "text": "ay"}])
    return tmp_path


@pytest.fixture
def class_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")  # its own folder: some tests also use ``captioned``
    png(root / "dog" / "1.png", 10)
    png(root / "cat" / "1.png", 20)
    png(root / "cat" / "2.png", 30)
    return root


@pytest.fixture
def fashion_idx(tmp_path_factory):
    """A fake Fashion-MNIST folder: 5 train / 3 test 'images' whose pixels equal their label."""
    tmp_path = tmp_path_factory.mktemp("idx")
    for split, labels in [("train", [3, 0, 9, 1, 4]), ("t10k", [7, 2, 5])]:
        n = len(labels)
        images = torch.tensor(labels, dtype=torch.uint8)[:, None, None].expand(n, 2, 2).contiguous()
        with gzip.open(tmp_path / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", n, 2, 2) + images.numpy().tobytes())
        with gzip.open(tmp_path / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", n) + bytes(labels))
    return tmp_path


def test_metadata_captions_come_in_metadata_order_with_nested_files(captioned):
    data = load_conditioned(f"folder:{captioned}")
    assert data.kind == "captions" and data.labels is None and data.class_names is None
    assert data.captions == ["bee", "sea", "ay"]
    assert pixel(data.images) == [20, 30, 10]
    assert data.images.shape == (3, 3, 4, 4)


def test_a_listed_file_that_is_missing_is_refused_naming_it_and_its_line(captioned):
    metadata(captioned, [{"file_name": "a.png", "text": "ay"}, {"file_name": "gone.png", "text": "?"}])
    with pytest.raises(ValueError, match=r"line 2.*gone\.png"):
        load_conditioned(f"folder:{captioned}")


@pytest.mark.parametrize("row", [{"file_name": "a.png"}, {"text": "ay"}, {"file_name": "a.png", "text": 3}])
def test_a_metadata_line_without_file_name_or_string_text_is_refused(captioned, row):
    metadata(captioned, [{"file_name": "b.png", "text": "bee"}, {"file_name": "sub/c.png", "text": "sea"}, row])
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 3"):
        load_conditioned(f"folder:{captioned}")


@pytest.mark.parametrize("name, message", [("a.png", "already listed on line 1"), ("../a.png", "outside")])
def test_a_metadata_file_listed_twice_or_outside_the_folder_is_refused(captioned, name, message):
    metadata(captioned, [{"file_name": "a.png", "text": "ay"}, {"file_name": name, "text": "again"}])
    with pytest.raises(ValueError, match=message):
        load_conditioned(f"folder:{captioned}")


def test_an_image_metadata_does_not_list_is_refused_with_a_count(captioned):
    png(captioned / "extra.png", 40)
    with pytest.raises(ValueError, match=r"1 image\(s\).*not in metadata\.jsonl.*extra\.png"):
        load_conditioned(f"folder:{captioned}")


def test_a_class_per_subfolder_tree_gives_labels_of_the_sorted_subfolder_names(class_tree):
    data = load_conditioned(f"folder:{class_tree}")
    assert data.kind == "labels" and data.captions is None
    assert data.class_names == ["cat", "dog"]
    assert data.labels.dtype == torch.int64
    assert data.labels.tolist() == [0, 0, 1]
    assert pixel(data.images) == [20, 30, 10]


def test_an_empty_class_folder_is_refused_rather_than_shifting_labels(class_tree):
    (class_tree / "bird").mkdir()
    with pytest.raises(ValueError, match="bird has no images"):
        load_conditioned(f"folder:{class_tree}")


def test_loose_images_beside_class_subfolders_are_ambiguous(class_tree):
    png(class_tree / "loose.png", 50)
    with pytest.raises(ValueError, match="cannot tell whether the subfolders are classes.*metadata.jsonl"):
        load_conditioned(f"folder:{class_tree}")
    assert load_conditioned(f"folder:{class_tree}", conditions="none").images.shape[0] == 4


def test_a_plain_folder_has_no_conditions(tmp_path):
    png(tmp_path / "a.png", 10)
    png(tmp_path / "b.png", 20)
    data = load_conditioned(f"folder:{tmp_path}")
    assert data.kind == "none" and data.labels is None and data.captions is None and data.class_names is None
    assert pixel(data.images) == [10, 20]


def test_conditions_forces_a_kind_and_refuses_the_other_naming_what_the_source_has(captioned, class_tree):
    assert load_conditioned(f"folder:{captioned}", conditions="captions").captions == ["bee", "sea", "ay"]
    with pytest.raises(ValueError, match="has captions"):
        load_conditioned(f"folder:{captioned}", conditions="labels")
    with pytest.raises(ValueError, match="has class labels"):
        load_conditioned(f"folder:{class_tree}", conditions="captions")
    with pytest.raises(ValueError, match="unknown conditions"):
        load_conditioned(f"folder:{captioned}", conditions="label")


def test_conditions_none_drops_them_and_reads_what_load_images_reads(captioned):
    data = load_conditioned(f"folder:{captioned}", conditions="none")
    assert data.kind == "none"
    assert torch.equal(data.images, load_images(f"folder:{captioned}"))


def test_a_plain_folder_refuses_a_forced_condition(tmp_path):
    png(tmp_path / "a.png", 10)
    with pytest.raises(ValueError, match="has no conditions"):
        load_conditioned(f"folder:{tmp_path}", conditions="labels")


def test_limit_keeps_the_first_images_with_their_conditions(captioned, fashion_idx):
    data = load_conditioned(f"folder:{captioned}", limit=2)
    assert data.captions == ["bee", "sea"] and pixel(data.images) == [20, 30]
    data = load_conditioned("fashion_mnist", root=str(fashion_idx), limit=2)
    assert data.labels.tolist() == [3, 0] and pixel(data.images) == [3, 0]


def test_fashion_mnist_idx_gives_labels_matching_images_and_the_ten_class_names(fashion_idx):
    data = load_conditioned("fashion_mnist", "test", size=4, channels=3, root=str(fashion_idx))
    assert data.labels.tolist() == [7, 2, 5]
    assert data.class_names == list(FASHION_MNIST_CLASSES)
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert data.images.shape == (3, 3, 4, 4)
    assert torch.equal(data.images, load_images("fashion_mnist", "test", size=4, channels=3, root=str(fashion_idx)))
    dropped = load_conditioned("fashion_mnist", "test", root=str(fashion_idx), conditions="none")
    assert dropped.labels is None and dropped.class_names is None


def test_a_whole_data_config_can_be_passed_to_either_loader(fashion_idx, tmp_path):
    config = DataConfig(root=str(fashion_idx), conditions="labels", prompts=str(tmp_path / "unused.txt"))
    assert load_images(**given(config)).shape == (5, 1, 2, 2)
    assert load_conditioned(**given(config)).labels.tolist() == [3, 0, 9, 1, 4]


def test_conditioned_images_refuses_inconsistent_conditions():
    images = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="not both"):
        ConditionedImages(images, torch.zeros(2, dtype=torch.int64), ["a", "b"])
    with pytest.raises(ValueError, match="int64"):
        ConditionedImages(images, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        ConditionedImages(images, captions=["a"])


def test_prompts_are_stripped_lines_without_empty_ones(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a red fox \n\n\t\nsnow at dusk\n")
    assert load_prompts(path) == ["a red fox", "snow at dusk"]
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(tmp_path / "missing.txt")

