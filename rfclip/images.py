"""Turning user images into upright RGB uint8 arrays, and resizing them for a method.

Every entry point of the library (``Segmenter.predict``, the CLI, the Ray job's decode task) goes
through :func:`to_rgb_array`, so one place decides how odd modes (CMYK, 16-bit, palette, grayscale,
RGBA) and EXIF orientation are handled.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

ImageLike = Union[Image.Image, np.ndarray]

# File endings listed as images (case-insensitive) by every tool that walks a folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Convert a PIL image or an array to an upright ``(H, W, 3) uint8`` RGB array.

    PIL inputs: EXIF orientation is applied; palette, grayscale, CMYK, LA/RGBA (alpha dropped) are
    converted; 16-bit ``I;16`` images are scaled from 0-65535; 32-bit ``I`` images are taken as 8-bit
    values where they fit (max <= 255), else scaled from 0-65535, clipped; ``F`` images must lie in [0, 1].
    Arrays: ``(H, W)`` gray, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (alpha dropped first):
    uint8 is taken as is, uint16 is scaled from 0-65535 (12-bit data in a uint16 container comes out
    dark: scale it to 16 bits first), other integer types must hold 0-255 (8-bit values in a wide
    type, taken as is), floats must lie in [0, 1], bools are black and white. Nothing is guessed from
    an image's content, so two frames of one camera get the same scale.
    """
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        mode = image.mode
        if mode.startswith("I;16"):
            return _array_to_rgb(np.asarray(image).astype(np.uint16))
        if mode == "I":
            arr = np.asarray(image)
            scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0
            return _array_to_rgb(np.clip(arr * scale + (0.5 if scale != 1.0 else 0), 0, 255).astype(np.uint8))
        if mode == "F":
            return _array_to_rgb(np.asarray(image))
        if mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4; got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image array is empty: shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2 and not arr.dtype.isnative:
        arr = arr.astype(np.uint16)                      # big-endian 16-bit data ('>u2'), to native order
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = (arr / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high > 255:
            raise ValueError(f"an image array of {arr.dtype} must hold 8-bit values 0-255, got {low}..{high}; "
                             f"pass uint16 for 16-bit data (scaled from 0-65535) or uint8")
        out = arr.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if np.isnan(arr).any():
            raise ValueError("a float image holds NaN values")
        low, high = float(arr.min()), float(arr.max())
        if low < -1e-3 or high > 1.0 + 1e-3:
            raise ValueError(f"a float image must hold values in [0, 1], got [{low:g}, {high:g}]"
                             f"{' (divide 0-255 values by 255, or pass uint8)' if high > 1 else ''}")
        out = np.clip(arr.astype(np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    else:
        raise TypeError(f"unsupported image dtype {arr.dtype}")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out)


def resized_shape(height: int, width: int, short_side: int, max_long_side: int = 2048) -> tuple[int, int]:
    """Size ``(h, w)`` with the short side at ``short_side``, aspect kept, long side capped.

    ``short_side <= 0`` keeps the original size.
    """
    if short_side <= 0:
        return height, width
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_long_side:
        scale = max_long_side / max(height, width)
    # rounded half up, as mmcv's ``rescale_size`` (behind MMSegmentation's ``Resize``), not half to even
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_short_side(rgb: np.ndarray, short_side: int, max_long_side: int = 2048) -> np.ndarray:
    """Bilinear resize of an ``(H, W, 3) uint8`` array (METHODS.md §1 "Input size").

    Returns ``(h, w, 3) uint8``. Plain bilinear (no antialiasing), as MMSegmentation's ``Resize``
    (cv2 ``INTER_LINEAR``) does in the pipelines behind the published numbers.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"resize_short_side takes an (H, W, 3) uint8 RGB array, not shape {rgb.shape} "
                         f"{rgb.dtype}; rfclip.to_rgb_array makes one of an image or another array")
    # np.require: contiguous and writable (np.asarray of a PIL image is read-only, and torch.from_numpy warns
    # of those), copied only where it is not.
    image = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1)
    return resize_short_side_tensor(image, short_side, max_long_side).permute(1, 2, 0).numpy()


def resize_short_side_tensor(image: torch.Tensor, short_side: int, max_long_side: int = 2048) -> torch.Tensor:
    """:func:`resize_short_side` for a ``(3, H, W) uint8`` tensor on any device: ``(3, h, w) uint8``.

    The result is rounded back to uint8, as the published pipelines store the resized image."""
    h, w = resized_shape(image.shape[1], image.shape[2], short_side, max_long_side)
    if (h, w) == tuple(image.shape[1:]):
        return image
    t = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False)
    return t[0].round().clamp(0, 255).to(torch.uint8)


def _bilinear_taps(n_in: int, n_out: int, start: int, stop: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices ``i0, i1`` (long) and weights of ``i1`` (float32) of output positions
    ``start..stop-1`` when ``n_in`` samples are resized to ``n_out`` as ``F.interpolate(mode="bilinear",
    align_corners=False)`` does: ``src = max((dst + 0.5) * n_in / n_out - 0.5, 0)``."""
    # in float32, as PyTorch computes them: positions agree with its own to about one ulp
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    dst = torch.arange(start, stop, device=device, dtype=torch.float32)
    src = (scale.to(device) * (dst + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    return i0, (i0 + 1).clamp(max=n_in - 1), src - i0


def bilinear_rows(x: torch.Tensor, size: tuple[int, int], r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of ``x`` ``(C, h, w)`` float resized to ``size`` ``(H, W)`` bilinearly
    (``align_corners=False``): ``(C, r1 - r0, W)``, equal to ``F.interpolate(x[None], size,
    mode="bilinear")[0][:, r0:r1]`` up to float rounding (source positions within an ulp: about 1e-5 on
    inputs of unit scale), without the whole ``(C, H, W)`` ever in memory."""
    c, h, w = x.shape
    H, W = size
    if (r0, r1) == (0, H):                                # all of it: PyTorch's kernel, in one pass
        return x if (h, w) == (H, W) else F.interpolate(x[None], size=size, mode="bilinear",
                                                        align_corners=False)[0]
    i0, i1, wy = _bilinear_taps(h, H, r0, r1, x.device)
    vert = torch.lerp(x[:, i0], x[:, i1], wy[:, None].to(x.dtype))                # (C, b, w): the band's rows
    # Along rows the taps are PyTorch's own linear ones; its kernel is faster than a gather.
    return vert if w == W else F.interpolate(vert, size=W, mode="linear", align_corners=False)


def bilinear_row_bands(x: torch.Tensor, size: tuple[int, int], max_bytes: int):
    """Yield ``(r0, r1, band)``: :func:`bilinear_rows` of ``x`` ``(C, h, w)`` at ``size`` ``(H, W)``, rows
    ``r0:r1`` at a time, each band ``(C, r1 - r0, W)`` at most about ``max_bytes`` (at least one row).
    Where all of it fits: one band, from ``F.interpolate``."""
    c, h, w = x.shape
    H, W = size
    rows = max(1, min(H, max_bytes // max(1, c * W * x.element_size())))
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        yield r0, r1, bilinear_rows(x, size, r0, r1)
