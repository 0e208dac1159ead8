"""Pixels and grids: the one conversion between the model's [-1, 1] and uint8, and the one grid.

Every stage that shows or measures images (training sample grids, `flowar sample`, evaluation's
Inception input and grid, the VAE's reconstructions, the quickstart's classifier check) converts
here, so a rounding or clamping choice is made once.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from flowar.vae import to_uint8  # its home: beside decode, for the MLflow model's use too

__all__ = ["to_uint8", "from_uint8", "image_grid", "save_png"]

GAP = 2  # white pixels between (and around) the images of a grid


def from_uint8(pixels) -> torch.Tensor:
    """uint8 pixels (tensor or numpy, any shape) -> float32 in [-1, 1], as the VAE and models take."""
    return torch.as_tensor(pixels).float().div(127.5).sub(1)


def image_grid(images, per_row: int) -> np.ndarray:
    """(B, C, H, W) images (uint8, or float in [-1, 1]) -> one (rows, cols, 3) uint8 array with
    `per_row` images a row and GAP white pixels between them; grey is shown as RGB."""
    images = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    grid = make_grid(images.cpu(), nrow=per_row, padding=GAP, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def save_png(grid: np.ndarray, path):
    """Write an (H, W, 3) uint8 array as a PNG at `path`: a local path (its folder created),
    returned as a Path, or a storage URI (pipelines/core/storage.py), returned as given."""
    from pipelines.core import storage

    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())
    return path if storage.is_uri(path) else Path(path)
