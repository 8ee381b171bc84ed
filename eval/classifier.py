"""An offline feature space for Fashion-MNIST: a small CNN classifier whose penultimate features give a
Frechet distance, reported as ``FD-fmnist`` (never "FID": the features are not Inception's).

    fewstep train-classifier out=teachers/fmnist/classifier.pt      # trains, prints test accuracy

Registered as the extractor ``fmnist-classifier`` (feature ``"128"``); weights from ``--weights`` /
``FeatureExtractor(weights=...)``, default the committed ``teachers/fmnist/classifier.pt``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ClassifierConfig
from ..io import atomic_save
from ..teachers import FMNIST_CLASSIFIER
from .features import ExtractorBase, register_extractor

__all__ = ["FMNISTNet", "train_classifier", "accuracy", "ClassifierExtractor", "DEFAULT_WEIGHTS", "cli"]

DEFAULT_WEIGHTS = FMNIST_CLASSIFIER  # package data: found from any folder, editable or wheel install


class FMNISTNet(nn.Module):
    """Conv(32)-Conv(64)-pool-Conv(64)-pool -> 128-d features -> 10 logits; input [-1, 1], 1x28x28."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * w * 7 * 7, 128), nn.SiLU())
        self.head = nn.Linear(128, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def accuracy(net: FMNISTNet, images: Tensor, labels: Tensor, batch: int = 1000) -> float:
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
                      for i in range(0, len(images), batch))
    return correct / len(images)


def train_classifier(steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     root: str | None = None) -> tuple[FMNISTNet, float]:
    """Train on Fashion-MNIST's train split (random shifts as augmentation); returns (net, test accuracy)."""
    from fewstep.data import load_fashion_mnist, preprocess

    torch.manual_seed(seed)
    train_x, train_y = load_fashion_mnist("train", root, labels=True)
    test_x, test_y = load_fashion_mnist("test", root, labels=True)
    train_x, test_x = preprocess(train_x), preprocess(test_x)
    net = FMNISTNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train_x), (batch_size,), generator=g)
        x = train_x[idx]
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        loss = F.cross_entropy(net(x), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval(), accuracy(net, test_x, test_y)


class ClassifierExtractor(ExtractorBase):
    """torch-fidelity extractor over ``FMNISTNet``'s 128-d penultimate features (uint8 [B, C, H, W] in)."""

    features = ("128", "logits")
    isc_feature = "logits"
    input_size = 28
    channels = None

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = Path(feature_extractor_weights_path or DEFAULT_WEIGHTS)
        self.load_net(FMNISTNet, path, f"classifier weights {path} not found; train them with "
                                       "`fewstep train-classifier out=PATH`")

    def extract(self, x):
        gray = x.float().mean(dim=1, keepdim=True) / 127.5 - 1
        if gray.shape[-2:] != (28, 28):
            gray = F.interpolate(gray, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        feats = self.net.features(gray)
        return {"128": feats, "logits": self.net.head(feats)}


register_extractor("fmnist-classifier", ClassifierExtractor, resize="bilinear-28")


def cli(config: ClassifierConfig) -> int:
    """``fewstep train-classifier``: train, save the weights, print the test accuracy."""
    out = Path(config.out or DEFAULT_WEIGHTS)
    start = time.perf_counter()
    net, acc = train_classifier(config.steps, config.batch_size, config.lr, config.seed, config.root)
    atomic_save(net.state_dict(), out)  # its folder made; a full disk: one line, no torn weights
    print(f"test accuracy {acc:.4f} after {config.steps} steps ({time.perf_counter() - start:.0f} s); saved {out}")
    return 0
