"""Robust decoding of bad and unusual image files (pipeline/decode.py)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import DecodeError, decode_image


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(h=40, w=60, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"this is a text file pretending to be a jpeg\n" * 5, "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
])
def test_bad_bytes_get_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


def test_truncated_jpeg_and_png_are_errors():
    arr = _rgb(300, 400)
    for fmt in ("JPEG", "PNG"):
        data = _enc(Image.fromarray(arr), fmt)
        with pytest.raises(DecodeError, match="truncated|corrupt"):
            decode_image(data[: int(len(data) * 0.6)])


def test_too_many_pixels_is_rejected_from_the_header():
    data = _enc(Image.new("L", (8000, 7000)), "PNG")       # 56 MP of zeros: a tiny file
    assert len(data) < 200_000
    with pytest.raises(DecodeError, match="too large: 8000x7000"):
        decode_image(data)                                  # default max_pixels = 50 MP
    with pytest.raises(DecodeError, match="max_pixels 1000"):
        decode_image(_enc(Image.fromarray(_rgb()), "PNG"), max_pixels=1000)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_unusual_modes_become_rgb_uint8(mode):
    base = Image.fromarray(_rgb())
    if mode == "I;16":
        im = Image.fromarray((np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 27))
        assert im.mode == "I;16"
        fmt = "PNG"
    else:
        im = base.convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(_enc(im, fmt))
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert out[..., 0].max() > 200 and out[..., 0].min() == 0   # scaled from 16 bits, not clipped


def test_exif_rotated_jpeg_is_made_upright():
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:10, :10] = 255                                     # bright top-left corner, as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                        # "rotate 90 CW to display"
    out = decode_image(_enc(Image.fromarray(arr), "JPEG", exif=exif, quality=95))
    assert out.shape == (60, 40, 3)                         # upright size swaps width and height
    assert out[:10, -10:].mean() > 200 and out[:10, :10].mean() < 50   # corner moved to top-right


def test_webp_bmp_tiff_decode():
    arr = _rgb()
    for fmt in ("WEBP", "BMP", "TIFF"):
        out = decode_image(_enc(Image.fromarray(arr), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
        np.testing.assert_array_equal(out, arr)


def test_array_dtypes_have_fixed_scales_not_guessed_from_content():
    from rfclip.images import to_rgb_array

    rgb = _rgb()
    for dtype in (np.int32, np.int64, np.int16):                     # 0-255 values in a wide type: as they are
        np.testing.assert_array_equal(to_rgb_array(rgb.astype(dtype)), rgb)
    full16 = rgb.astype(np.uint16) * 257                              # uint16: 0-65535, whatever the content
    np.testing.assert_array_equal(to_rgb_array(full16), rgb)
    np.testing.assert_array_equal(to_rgb_array(full16.astype(">u2")), rgb)      # big-endian 16-bit, the same
    np.testing.assert_array_equal(to_rgb_array(Image.fromarray(full16[..., 0])), np.repeat(rgb[..., :1], 3, 2))
    dark = to_rgb_array(rgb.astype(np.uint16))                        # 8-bit values in uint16: dark, not stretched
    assert dark.max() <= 1
    rgba16 = np.dstack([full16, np.full(rgb.shape[:2], 65535, np.uint16)])
    np.testing.assert_array_equal(to_rgb_array(rgba16), rgb)          # alpha dropped first
    np.testing.assert_array_equal(to_rgb_array(rgb / 255.0), rgb)
    with pytest.raises(ValueError, match="divide 0-255 values by 255"):
        to_rgb_array(rgb.astype(np.float32))                           # 0-255 floats: not guessed
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_array(np.where(rgb > 250, np.nan, rgb / 255.0))
    with pytest.raises(ValueError, match="8-bit values 0-255, got -10"):
        to_rgb_array(rgb.astype(np.int16) - 10)
    with pytest.raises(ValueError, match="pass uint16"):
        to_rgb_array(rgb.astype(np.int32) * 16)
    i32 = Image.fromarray(rgb[..., 0].astype(np.int32) * 257)            # PIL "I": beyond 255, from 0-65535
    assert i32.mode == "I"
    np.testing.assert_array_equal(to_rgb_array(i32)[..., 0], rgb[..., 0])


def test_working_sizes_round_half_up_as_mmcv_does():
    """mmcv's ``rescale_size`` (MMSegmentation's ``Resize``) rounds ``x * scale + 0.5`` down; Python's
    ``round`` would take 346.5 to 346."""
    from rfclip.images import resized_shape

    assert resized_shape(128, 132, 336) == (336, 347)                  # 132 * 336 / 128 = 346.5
    assert resized_shape(500, 375, 336) == (448, 336)
    assert resized_shape(100, 10000, 336, max_long_side=2048) == (20, 2048)   # the long side capped
