"""A small Fashion-MNIST classifier that judges whether generated samples show their class.

Trained once on the Fashion-MNIST training set (the same 28 -> 32 px padding as `flowar encode`),
cached as safetensors + JSON, and used by the quickstart: the accuracy with which it recovers the
conditioning class of generated images is a direct, human-readable measure of class fidelity
(FID says nothing about whether a "Trouser" sample looks like trousers).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from pipelines.core.images import from_uint8
from pipelines.data.bundled import fashion_mnist_file
from pipelines.data.sources import read_idx


def load_fashion_mnist(split: str = "train", limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32) padded like the encode job, labels int64 (N,))."""
    images = read_idx(fashion_mnist_file(split, "images"))
    labels = read_idx(fashion_mnist_file(split, "labels")).astype(np.int64)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return np.pad(images, ((0, 0), (2, 2), (2, 2))), labels


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        # Strided convolutions: ~90% test accuracy in a minute of CPU, which is all a judge of
        # class fidelity needs.
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 4 * 4, num_classes))

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        """grey (B, 1, 32, 32) in [-1, 1]."""
        return self.net(grey)


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) or (B, 1, H, W) in [-1, 1] -> (B, 1, 32, 32)."""
    grey = images.float().mean(dim=1, keepdim=True) if images.shape[1] == 3 else images.float()
    if grey.shape[-1] != 32:
        grey = nn.functional.interpolate(grey, size=(32, 32), mode="area")
    return grey


def _batches(images: np.ndarray, labels: np.ndarray, batch: int, shuffle: bool, seed: int = 0):
    order = np.random.default_rng(seed).permutation(len(images)) if shuffle else np.arange(len(images))
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        x = from_uint8(images[idx]).unsqueeze(1)
        yield x, torch.from_numpy(labels[idx])


def train_classifier(out_dir: str | Path, epochs: int = 2, limit: int = 0, seed: int = 0,
                     progress: bool = True) -> dict:
    """Train (or reuse) the classifier; returns its record with the test-set accuracy."""
    out = Path(out_dir)
    record_path = out / "classifier.json"
    if record_path.is_file() and (out / "classifier.safetensors").is_file():
        return json.loads(record_path.read_text())
    torch.manual_seed(seed)
    images, labels = load_fashion_mnist("train", limit)
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        steps = tqdm(list(_batches(images, labels, 256, True, seed + epoch)), disable=not progress,
                     desc=f"classifier epoch {epoch + 1}/{epochs}", leave=False)
        for x, y in steps:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    test_x, test_y = load_fashion_mnist("test")
    model.eval()
    acc = accuracy(model, from_uint8(test_x).unsqueeze(1), torch.from_numpy(test_y))
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(out / "classifier.safetensors"))
    record = {"test_accuracy": acc, "epochs": epochs, "train_images": len(images),
              "seconds": round(time.time() - start, 1)}
    record_path.write_text(json.dumps(record, indent=2))
    return record


def load_classifier(out_dir: str | Path) -> SmallCNN:
    path = Path(out_dir) / "classifier.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no classifier at {path}: run train_classifier first")
    model = SmallCNN()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images (in [-1, 1]) classified as their label."""
    model.eval()
    correct = 0
    for i in range(0, len(images), 512):
        correct += (model(to_grey(images[i:i + 512])).argmax(-1) == labels[i:i + 512]).sum().item()
    return correct / max(len(images), 1)
