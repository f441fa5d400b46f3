"""Random open_clip models saved to disk, for tests and benchmarks (no pretrained weights exist here).

``make_tiny_model_files`` writes a tiny ViT (width 64, 2 layers, patch 16, 4 heads) as an open_clip
model-config JSON plus a checkpoint, so any process (a Ray worker, the CLI) can load it with
``Segmenter(model=config_json, weights=checkpoint)``. ``plant_distractors`` edits a random model so
that chosen patches become over-activated in the distraction dimensions, as real CLIP weights make
some tokens: the refocusing steps then have work to do.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import open_clip
import torch

from .weights import register_model


def tiny_config(width: int = 64, layers: int = 2, heads: int = 4, patch: int = 16, embed_dim: int = 32) -> dict:
    """An open_clip model config for a tiny CLIP ViT at 224 px (a 14x14 grid, like ViT-B/16)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 224, "layers": layers, "width": width,
                       "head_width": width // heads, "patch_size": patch},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def save_checkpoint(model: torch.nn.Module, path: str | Path, fmt: str = "pt") -> Path:
    """Save ``model``'s weights as ``fmt``:

    - ``"pt"``: a plain state dict (the OpenAI / open_clip key layout);
    - ``"openclip"``: an open_clip training checkpoint, ``{"epoch", "state_dict": {"module.…"}}``;
    - ``"safetensors"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if fmt == "pt":
        torch.save(sd, path)
    elif fmt == "openclip":
        torch.save({"epoch": 1, "name": "random", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    return path


def make_tiny_model_files(directory: str | Path, fmt: str = "pt", seed: int = 0, name: str = "rfclip-tiny",
                          plant: bool = False, **config) -> tuple[str, str]:
    """Write ``<name>.json`` and a random checkpoint into ``directory``.

    Returns ``(model_config_json_path, weights_path)``. ``config`` overrides :func:`tiny_config`'s
    arguments; ``plant=True`` applies :func:`plant_distractors` with the model's first channels.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg_path = directory / f"{name}.json"
    cfg_path.write_text(json.dumps(tiny_config(**config), indent=1))
    arch = register_model(str(cfg_path))
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    if plant:
        plant_distractors(model.visual, dims=range(min(8, model.visual.conv1.out_channels)), seed=seed)
    suffix = {"pt": ".pt", "openclip": ".pt", "safetensors": ".safetensors"}[fmt]
    weights = save_checkpoint(model, directory / f"{name}-{fmt}{suffix}", fmt)
    return str(cfg_path), str(weights)


def distractor_pattern(patch: int, seed: int = 0) -> np.ndarray:
    """``(patch, patch, 3) uint8`` checkerboard-like pattern (0 or 255) that planted channels detect."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, size=(patch, patch, 3)) * 255).astype(np.uint8)


@torch.no_grad()
def plant_distractors(visual, dims: Sequence[int], seed: int = 0, strength: float = 0.02) -> np.ndarray:
    """Make ``visual.conv1`` fire strongly in channels ``dims`` on :func:`distractor_pattern` patches.

    The filter for each channel in ``dims`` becomes ``strength *`` the pattern's sign (+1 / -1): a
    patch painted with the pattern gets a response of about ``strength * 3 * patch**2 * 1.8``
    (normalised pixels are about ±1.8), while smooth content correlates weakly with it. Returns the
    pattern, ``(patch, patch, 3) uint8``.
    """
    patch = visual.conv1.kernel_size[0]
    pattern = distractor_pattern(patch, seed)
    sign = torch.from_numpy(pattern.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, p, p) in {-1, 1}
    for d in dims:
        visual.conv1.weight[d] = strength * sign
    return pattern


def paint_pattern(image: np.ndarray, pattern: np.ndarray, cells: Sequence[tuple[int, int]]) -> np.ndarray:
    """Copy ``pattern`` into ``image`` (``(H, W, 3) uint8``) at grid cells ``(row, col)``; returns a copy."""
    out = image.copy()
    p = pattern.shape[0]
    for r, c in cells:
        out[r * p:(r + 1) * p, c * p:(c + 1) * p] = pattern
    return out


def random_model(model: str = "ViT-B-16", seed: int = 0, plant_dims: Optional[Sequence[int]] = None):
    """A random full-size open_clip CLIP model (float32, eval), optionally with planted distractors."""
    arch = register_model(model)
    torch.manual_seed(seed)
    clip = open_clip.create_model(arch, pretrained=None).eval()
    if plant_dims is not None:
        plant_distractors(clip.visual, plant_dims, seed=seed)
    return clip
