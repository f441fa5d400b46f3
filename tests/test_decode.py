"""Robust decoding of bad and unusual image files (rfclip/decode.py)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rfclip import decode
from rfclip.decode import DecodeError, decode_image, max_file_bytes


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


def test_a_file_longer_than_any_image_of_max_pixels_is_refused_before_parsing(monkeypatch):
    monkeypatch.setattr(decode, "METADATA_BYTES", 1000)
    arr = np.random.default_rng(1).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    raw = _enc(Image.fromarray(arr), "PNG", compress_level=0)   # incompressible, stored: > 4 bytes a pixel
    assert len(raw) > 4 * 30 * 40
    assert decode_image(raw, max_pixels=30 * 40).shape == (30, 40, 3)   # the widest real file still fits
    padded = raw + b"\0" * (max_file_bytes(30 * 40) + 1 - len(raw))      # a PNG with junk after its end
    with pytest.raises(DecodeError, match=f"file too large: more than {max_file_bytes(30 * 40)} bytes"):
        decode_image(padded, max_pixels=30 * 40)


def test_the_decode_stage_reads_a_huge_file_only_up_to_the_limit(tmp_path, monkeypatch):
    """A sparse 4 GiB ``.jpg`` among good images becomes an error row, read no further than the limit."""
    import tracemalloc

    from pipeline.workers import decode_stage

    monkeypatch.setattr(decode, "METADATA_BYTES", 1000)
    good = tmp_path / "good.png"
    Image.fromarray(_rgb(20, 30)).save(good)
    huge = tmp_path / "huge[1].jpg"                 # glob characters: read through cat_file
    with open(huge, "wb") as f:
        f.truncate(4 << 30)
    batch = {"image_uri": np.array([str(good), str(huge), str(good)], dtype=object)}
    tracemalloc.start()
    try:
        out = decode_stage(batch, storage_options=None, max_pixels=20 * 30, short_side=20, max_long_side=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert out["error"][1].startswith(f"file too large: more than {max_file_bytes(20 * 30)} bytes")
    assert peak < 1 << 20, peak


def test_a_file_that_cant_be_read_is_an_error_row_and_storage_that_cant_be_read_stops_the_batch(tmp_path,
                                                                                                   monkeypatch):
    """A missing file is the file's fault: an error row. Storage past its retries (a timeout, botocore's
    EndpointConnectionError, no credentials) is not: the batch fails, so its shard stays uncommitted and a
    re-run reads the image again, instead of a permanent error row."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from pipeline import storage, workers
    from pipeline.workers import decode_stage

    good = tmp_path / "good.png"
    Image.fromarray(_rgb(20, 30)).save(good)
    batch = {"image_uri": np.array([str(good), str(tmp_path / "gone.png")], dtype=object)}
    out = decode_stage(batch, storage_options=None, max_pixels=10_000, short_side=20, max_long_side=100)
    assert list(out["status"]) == ["ok", "error"] and "file not found" in out["error"][1]
    for fault in (TimeoutError("read timed out"), EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
                  NoCredentialsError()):
        monkeypatch.setattr(workers, "read_uris", lambda uris, *a, fault=fault, **k: [b"x", fault][:len(uris)])
        with pytest.raises(storage.StorageError, match=f"can't read {tmp_path / 'gone.png'}, retries spent: "
                                                       f"{type(fault).__name__}"):
            decode_stage(batch, storage_options=None, max_pixels=10_000, short_side=20, max_long_side=100)
    assert not storage.storage_fault(FileNotFoundError("gone")) and not storage.storage_fault(PermissionError("no"))
    assert storage.storage_fault(ConnectionError("reset")) and storage.storage_fault(NoCredentialsError())
    from aiohttp import ClientResponseError, RequestInfo
    from botocore.exceptions import ParamValidationError
    from yarl import URL

    def http(status):
        return ClientResponseError(RequestInfo(URL("http://h/a.jpg"), "GET", {}), (), status=status)

    assert not storage.storage_fault(http(403)) and not storage.storage_fault(http(410))   # the file's: error rows
    assert storage.storage_fault(http(503)) and storage.storage_fault(http(429))
    assert not storage.storage_fault(ParamValidationError(report="Invalid bucket name"))     # a malformed URI
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    def s3(code):                                  # what s3fs raises once botocore gives up
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": "m"},
                                                 "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject"))

    assert storage.storage_fault(s3("InvalidAccessKeyId")) and storage.storage_fault(s3("SignatureDoesNotMatch"))
    assert not storage.storage_fault(s3("AccessDenied"))                                  # may be this object's


def test_a_pipe_named_like_an_image_is_an_error_row_not_a_hang(tmp_path):
    """A FIFO blocks a read until something writes to it: it is refused unread, by the job's decode stage
    and by the tools' decode_file, and the other images are decoded."""
    import os

    from rfclip.decode import decode_file
    from pipeline.workers import decode_stage

    good = tmp_path / "good.png"
    Image.fromarray(_rgb(20, 30)).save(good)
    os.mkfifo(tmp_path / "pipe.jpg")
    batch = {"image_uri": np.array([str(tmp_path / "pipe.jpg"), str(good)], dtype=object)}
    out = decode_stage(batch, storage_options=None, max_pixels=10_000, short_side=20, max_long_side=100)
    assert list(out["status"]) == ["error", "ok"] and "not a regular file (a pipe" in out["error"][0]
    with pytest.raises(DecodeError, match="not a regular file"):
        decode_file(str(tmp_path / "pipe.jpg"))
    assert decode_file(str(good)).shape == (20, 30, 3)


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
