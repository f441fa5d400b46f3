"""Fixtures of the library tests: a tiny random open_clip model with planted distractors, saved to
disk, and images painted with their pattern (the plain tiny model is ``tiny_model`` in conftest.py).

Imported into test modules (``from _tiny import ...``).
"""
import numpy as np
import pytest
import torch

from rfclip.segmenter import MEAN, STD
from rfclip.testing import distractor_pattern, make_tiny_model_files, paint_pattern

PLANTED_DIMS = list(range(8))


@pytest.fixture(scope="session")
def planted_files(tmp_path_factory):
    """A tiny ViT (4 layers) with distractors planted in channels 0-7 (see rfclip.testing)."""
    return make_tiny_model_files(tmp_path_factory.mktemp("planted"), plant=True, seed=3, layers=4)


def planted_image(h=224, w=288, seed=0, cells=((2, 3), (7, 7), (10, 12))):
    """``(h, w, 3) uint8`` smooth random image with the distractor pattern painted in grid cells."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(yy * (c + 1) + xx * (3 - c)) % 256 for c in range(3)], -1).astype(np.float64)
    base = (0.6 * base + 0.4 * rng.integers(0, 255, size=(1, 1, 3))).astype(np.uint8)
    return paint_pattern(base, distractor_pattern(16, seed=3), cells)


def planted_crops(n=2, h=224, w=160, dtype=torch.float64):
    """``(n, 3, h, w)`` CLIP-normalised crops of ``planted_image`` (seeds 0..n-1): the planted model
    finds distractors in them, so RF-CLIP's steps run."""
    imgs = torch.stack([torch.from_numpy(planted_image(h, w, seed=s)) for s in range(n)]).permute(0, 3, 1, 2)
    mean = torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
    return ((imgs.double() / 255 - mean) / std).to(dtype)
