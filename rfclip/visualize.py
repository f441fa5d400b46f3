"""Colours for label maps: a fixed palette, label PNGs, and overlays with a legend of class names."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(n: int, background: bool = True) -> np.ndarray:
    """``(n, 3) uint8`` distinct colours: VOC's (index 0 black, 255 the cream of ignored pixels).

    ``background=False``: VOC's colours from its index 1 (so index ``i`` has VOC's colour ``i + 1``, and
    254 the cream), for a vocabulary whose class 0 is a class like any other (``"sky; road; car"``), which
    black would hide in an overlay.
    """
    first = 0 if background else 1
    cmap = np.zeros((max(n, 1) + first, 3), dtype=np.uint8)
    for i in range(len(cmap)):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap[first:first + n]


def first_is_background(class_names) -> bool:
    """Whether class 0 is a background class (VOC's and PASCAL Context's ``background``), drawn black."""
    return bool(len(class_names)) and str(class_names[0]).split(",")[0].strip().lower() == "background"


def class_palette(class_names) -> np.ndarray:
    """``(K, 3) uint8``: the colours of ``class_names`` in masks, overlays and figures (black for class 0
    only when it is a background class)."""
    return palette(len(class_names), background=first_is_background(class_names))


def label_png(labels: np.ndarray, num_classes: int, colours: bool = True, background: bool = True,
              text: dict | None = None) -> bytes:
    """Encode ``(H, W)`` integer labels as PNG; pixel values are class indices.

    ``num_classes <= 256``: 8-bit, with the VOC palette (``palette(256, background)``) when ``colours``
    (mode P, viewable) or plain gray (mode L). More classes: 16-bit gray (a palette cannot hold them).
    ``text``: PNG text chunks to add (``{"Software": ...}``), written before the image data.
    """
    labels = np.asarray(labels)
    top = 255 if num_classes <= 256 else 65535
    if labels.size and (labels.min() < 0 or labels.max() > top):
        raise ValueError(f"labels must lie in [0, {top}] for a PNG of {num_classes} classes")
    if num_classes > 256:
        img = Image.fromarray(labels.astype(np.uint16))
    elif colours:
        img = Image.fromarray(labels.astype(np.uint8), mode="P")
        img.putpalette(palette(256, background).flatten().tolist())
    else:
        img = Image.fromarray(labels.astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1, pnginfo=png_text(text) if text else None)
    return buf.getvalue()


def png_text(text: dict):
    """A ``PIL.PngImagePlugin.PngInfo`` holding ``text``'s items as PNG text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return info


def decode_label_png(data: bytes) -> np.ndarray:
    """A single-channel label PNG's stored values, ``(H, W) int64``: the inverse of :func:`label_png` (any
    of its forms), and the reader of ground-truth label files. P-mode PNGs give their palette indices (not
    colours); RGB/RGBA images are refused (``ValueError``)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
            raise ValueError(f"label image must be single-channel (P, L, I;16, I); got mode {img.mode}")
        return np.asarray(img).astype(np.int64)


def overlay(rgb: np.ndarray, labels: np.ndarray, class_names: list[str], alpha: float = 0.5) -> Image.Image:
    """Blend a colour label map over ``rgb`` ``(H, W, 3) uint8`` and add a legend of the classes present."""
    colours = class_palette(class_names)
    blended = (rgb.astype(np.float32) * (1 - alpha) + colours[labels].astype(np.float32) * alpha).astype(np.uint8)
    present = [int(c) for c in np.unique(labels)]
    font = ImageFont.load_default()
    row = 16
    legend_w = 12 + max((int(font.getlength(class_names[c])) for c in present), default=40) + 28
    h = max(rgb.shape[0], row * len(present) + 8)
    canvas = Image.new("RGB", (rgb.shape[1] + legend_w, h), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, c in enumerate(present):
        y = 4 + k * row
        x = rgb.shape[1] + 6
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in colours[c]), outline=(0, 0, 0))
        draw.text((x + 18, y), class_names[c], fill=(0, 0, 0), font=font)
    return canvas
