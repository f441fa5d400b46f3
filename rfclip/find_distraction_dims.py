"""Find the distraction dimensions of a CLIP ViT (METHODS.md §3a), so RF-CLIP can run on it.

    python -m rfclip.find_distraction_dims --model M --weights W --images DIR_OR_URI [--limit 200]

For each image (resized to the model's input size) the plain forward is run; the block outputs'
patch tokens are averaged over layers (``z_bar``), min-shifted and sum-normalised per token
(``w_i[j] = z~_i[j] / sum_k z~_i[k]``), then averaged over tokens and images. The dimensions whose
mean weight peaks far above the rest (robust z-score over the median and MAD) are reported; pass them
as ``distraction_dims``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Iterable

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from .cli_args import add_weights_choices, positive_int
from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_file
from .images import IMAGE_SUFFIXES
from .segmenter import MEAN, STD, pick_device
from .vit import DenseViT
from .model_factory import load_clip
from .weights import WeightsError
from .warn import as_cli_lines


def list_images(uri: str, storage_options: dict | None = None, limit: int | None = None) -> list[str]:
    """Sorted image URIs under a folder or prefix (recursive), local or fsspec."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if fs.isfile(root):
        paths = [root]
    else:
        paths = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise FileNotFoundError(f"no images under {uri}")
    paths = paths[:limit] if limit else paths
    return [fs.unstrip_protocol(p) if "://" in uri else p for p in paths]


@torch.inference_mode()
def mean_embedding_weights(vit: DenseViT, images: Iterable[np.ndarray], batch_size: int = 8,
                           mean: tuple = MEAN, std: tuple = STD) -> tuple[torch.Tensor, int]:
    """``((D,) float64, n)``: the mean sum-normalised, layer-averaged patch embedding over the ``n``
    ``images`` (``(H, W, 3)`` uint8 each, taken ``batch_size`` at a time from any iterable, so a generator
    that decodes them holds one batch in memory), normalised with ``mean`` and ``std`` (RGB, 0-1 scale)."""
    side = vit.input_size
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    dtype = vit.visual.conv1.weight.dtype
    device = vit.visual.conv1.weight.device
    total = torch.zeros(vit.width, dtype=torch.float64)
    count, n = 0, 0
    images = iter(images)
    while batch := list(itertools.islice(images, batch_size)):
        n += len(batch)
        x = torch.cat([F.interpolate(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255.0, size=side,
                                     mode="bilinear", align_corners=False, antialias=True)
                       for im in batch])                                           # images differ in size
        x = (x - mean) / std
        tokens, _ = vit.embed(x.to(device, dtype))
        z_sum = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, vit.width, device=device)
        for block in vit.blocks:
            tokens = vit.plain_block(block, tokens)
            z_sum += tokens[:, 1:].float()
        z = z_sum / vit.num_layers
        z = z - z.amin(dim=-1, keepdim=True)
        w = z / z.sum(dim=-1, keepdim=True).clamp_min(1e-8)
        total += w.sum(dim=(0, 1)).double().cpu()
        count += w.shape[0] * w.shape[1]
    if n == 0:
        raise ValueError("no images to average over")
    return total / count, n


def robust_z(weights: torch.Tensor) -> torch.Tensor:
    """``(E,)`` float64 robust z-scores of the ``(E,)`` mean weights: distance from the median in MADs."""
    w = weights.double()
    med = w.median()
    return (w - med) / ((w - med).abs().median().clamp_min(1e-12) * 1.4826)


def peak_dimensions(weights: torch.Tensor, top: int = 16, z_threshold: float = 8.0) -> tuple[list[dict], list[int]]:
    """The ``top`` dimensions by mean weight, each with its robust z-score and whether it is a peak, and
    every peak (robust z above ``z_threshold``, listed or not), in ascending order."""
    w, z = weights.double(), robust_z(weights)
    order = torch.argsort(w, descending=True)[:top]
    rows = [{"dim": int(d), "weight": float(w[d]), "z": float(z[d]), "peak": bool(z[d] > z_threshold)} for d in order]
    return rows, (z > z_threshold).nonzero().flatten().tolist()


def main(argv: list[str] | None = None) -> int:
    """CLI; exit status 0 with peaks found, 1 when none clears the threshold, 2 on bad input."""
    with as_cli_lines():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m rfclip.find_distraction_dims", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--weights-sha256", default=None)
    add_weights_choices(p)
    p.add_argument("--images", required=True, help="folder, prefix or fsspec URI of images")
    p.add_argument("--storage-options", default=None, help="JSON fsspec options for --images and --weights URLs")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"larger images are skipped, from their header (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--limit", type=positive_int, default=200, help="images to use (default 200)")
    p.add_argument("--top", type=positive_int, default=16, help="dimensions to list (default 16)")
    p.add_argument("--z-threshold", type=float, default=8.0, help="robust z-score that makes a peak")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print JSON only")
    args = p.parse_args(argv)
    try:
        opts = json.loads(args.storage_options) if args.storage_options else None
        clip, _, arch, resolved = load_clip(args.model, args.weights, args.weights_sha256, storage_options=opts,
                                            quick_gelu=args.quick_gelu, image_mean=args.image_mean,
                                            image_std=args.image_std)
        vit = DenseViT(clip.visual.to(pick_device(args.device)))
        uris = list_images(args.images, opts, args.limit)

        def readable():
            """Each image that decodes, one at a time; the others are named on stderr and skipped."""
            for uri in uris:
                try:
                    yield decode_file(uri, args.max_pixels, opts)
                except (OSError, DecodeError) as exc:
                    print(f"{uri}: skipped, cannot read image: {exc}", file=sys.stderr)

        images = readable()
        first = next(images, None)
        if first is None:
            raise ValueError(f"no readable images under {args.images}")
        weights, n_images = mean_embedding_weights(vit, itertools.chain([first], images), mean=resolved.mean,
                                                   std=resolved.std)
    except (FileNotFoundError, ValueError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, peaks = peak_dimensions(weights, args.top, args.z_threshold)
    result = {"model": arch, "images": n_images, "distraction_dims": peaks, "top": rows}
    if not peaks:
        best = max(r["z"] for r in rows)
        print(f"no dimension peaks above robust z {args.z_threshold:g} (the highest is {best:.1f}); this model may "
              f"have no distraction dimensions, or try a lower --z-threshold or more images", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0 if peaks else 1
    print(f"{arch}: mean sum-normalised embedding weight over {n_images} images")
    print(f"{'dim':>6} {'weight':>10} {'robust z':>9}  peak")
    for r in rows:
        print(f"{r['dim']:>6} {r['weight']:>10.6f} {r['z']:>9.1f}  {'*' if r['peak'] else ''}")
    if not peaks:
        return 1
    unlisted = len(peaks) - sum(r["peak"] for r in rows)
    if unlisted:
        print(f"(and {unlisted} more peaks below these rows; --top {len(rows) + unlisted} lists them)")
    print(f"distraction_dims = {peaks}")
    print(f"use: --setting distraction_dims='{json.dumps(peaks)}'  (or Segmenter(..., distraction_dims={peaks}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
