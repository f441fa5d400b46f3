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

from .model_factory import register_model


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
def plant_distractors(visual, dims: Sequence[int], seed: int = 0, strength: float = 0.05,
                      offset: float = 1.0) -> np.ndarray:
    """Give a random ViT the two traits of real CLIP that RF-CLIP relies on, in channels ``dims``.

    - Every patch carries a raised level in ``dims`` (``offset`` added to the positional embedding),
      so the mean embedding weight peaks there (what ``find_distraction_dims`` looks for).
    - ``conv1`` detects :func:`distractor_pattern`: the filter of ``dims[0]`` becomes
      ``strength *`` the pattern's sign (+1 / -1) and the other ``dims`` a third of that, so a patch
      painted with the pattern is over-activated (a distractor), while smooth content correlates
      weakly with it.

    Returns the pattern, ``(patch, patch, 3) uint8``.
    """
    dims = list(dims)
    patch = visual.conv1.kernel_size[0]
    pattern = distractor_pattern(patch, seed)
    sign = torch.from_numpy(pattern.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, p, p) in {-1, 1}
    for i, d in enumerate(dims):
        visual.conv1.weight[d] = (strength if i == 0 else strength / 3) * sign
    visual.positional_embedding[1:, dims] += offset
    return pattern


def paint_pattern(image: np.ndarray, pattern: np.ndarray, cells: Sequence[tuple[int, int]]) -> np.ndarray:
    """Copy ``pattern`` into ``image`` (``(H, W, 3) uint8``) at grid cells ``(row, col)``; returns a copy.

    Cells that do not fit inside the image are skipped.
    """
    out = image.copy()
    p = pattern.shape[0]
    for r, c in cells:
        if (r + 1) * p <= out.shape[0] and (c + 1) * p <= out.shape[1]:
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


class _ArchiveNode(torch.nn.Module):
    """A scriptable module that only holds tensors (for :func:`save_torchscript_archive`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript_archive(model: torch.nn.Module, path: str | Path) -> Path:
    """Save ``model``'s tensors as a TorchScript archive laid out like OpenAI's released ``.pt`` files.

    OpenAI's files are ``torch.jit`` archives whose ``state_dict`` has the model's keys plus
    ``input_resolution``, ``context_length`` and ``vocab_size``; this writes the same structure.
    """
    root = _ArchiveNode()
    sd = dict(model.state_dict())
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        node = root
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, _ArchiveNode())
            node = getattr(node, name)
        node.register_buffer(leaf, value.detach().clone())
    path = Path(path)
    torch.jit.script(root).save(str(path))
    return path

