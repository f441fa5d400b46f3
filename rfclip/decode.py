"""Robust image decoding: bytes -> upright RGB uint8, or a :class:`DecodeError` with a reason.

Order of checks: empty file; file size (at most :func:`max_file_bytes`); format identified from the header; pixel count from the header
(before any pixel is decoded, so a decompression bomb costs nothing); full decode (truncated or
corrupt data fails here); mode and EXIF orientation via ``rfclip.images.to_rgb_array``.
"""
from __future__ import annotations

import io
import os
import stat

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000
METADATA_BYTES = 64 * 2**20      # EXIF, ICC profiles, thumbnails, XMP: allowed on top of the pixel data


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image of at most ``max_pixels`` pixels can need: 8 bytes a pixel (raw 16-bit
    RGBA or CMYK, the widest mode Pillow decodes, stored without compression) plus ``METADATA_BYTES``.
    Readers fetch at most one byte more than this, so a huge file is never read whole."""
    return int(max_pixels) * 8 + METADATA_BYTES


class DecodeError(ValueError):
    """An input that can't be segmented; ``str(err)`` is the reason stored in the error row."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` into an upright ``(H, W, 3) uint8`` RGB array.

    Handles grayscale, palette, RGBA/LA, CMYK, 16-bit and EXIF-rotated images (first frame of
    multi-frame files). Raises :class:`DecodeError` for empty, non-image, truncated or corrupt
    data, for files larger than :func:`max_file_bytes` (``data`` may be a file's first
    ``max_file_bytes(max_pixels) + 1`` bytes) and for images whose header declares more than
    ``max_pixels`` pixels.
    """
    from rfclip.images import to_rgb_array  # the one place that decides modes + EXIF (CONTRACT.md)

    if not data:
        raise DecodeError("empty file (0 bytes)")
    most = max_file_bytes(max_pixels)
    if len(data) > most:
        raise DecodeError(f"file too large: more than {most} bytes, which no image of at most max_pixels "
                          f"{max_pixels} pixels needs (8 bytes a pixel plus {METADATA_BYTES >> 20} MiB of metadata)")
    # PIL's own limit (it refuses 179 MP and more at open) would override --max-pixels: max_pixels,
    # checked from the header below, decides alone. The caller's limit is put back after the open.
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError(f"not an image, or a corrupt header: format not recognised ({len(data)} bytes)") from None
    except Exception as exc:  # noqa: BLE001 - any header parse failure is a corrupt file
        raise DecodeError(f"corrupt image header: {type(exc).__name__}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    with img:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise DecodeError(f"image has no pixels: {w}x{h}")
        if w * h > max_pixels:
            raise DecodeError(f"image too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001 - truncated streams raise OSError, others vary
            raise DecodeError(f"truncated or corrupt image data ({img.format}): {type(exc).__name__}: {exc}") from None
        try:
            return to_rgb_array(img)
        except Exception as exc:  # noqa: BLE001 - an exotic mode the converter rejects
            raise DecodeError(f"unsupported image mode {img.mode!r} ({img.format}): {exc}") from None


def is_regular_file(path: str) -> bool:
    """Whether the local ``path`` is a regular file (links followed); True where it can't be told, so that
    reading it reports why."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return True


def decode_file(uri: str, max_pixels: int = DEFAULT_MAX_PIXELS, storage_options: dict | None = None) -> np.ndarray:
    """:func:`decode_image` of a file (local path or fsspec URL), read no further than
    ``max_file_bytes(max_pixels) + 1`` bytes. Raises ``OSError`` when it can't be read."""
    import fsspec

    local = uri[len("file://"):] if uri.startswith("file://") else None if "://" in uri else uri
    if local is not None and not is_regular_file(local) and not os.path.isdir(local):
        # a pipe, socket or device: a read would block, or never end
        raise DecodeError("not a regular file (a pipe, socket or device): not read")
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        data = f.read(max_file_bytes(max_pixels) + 1)
    return decode_image(data, max_pixels)

