"""The Ray Data stages of the job, as ``map_batches`` callables.

Batches are ``dict[str, np.ndarray]`` (Ray Data's numpy format), one entry per image:

1. :func:`decode_stage` (CPU tasks): ``image_uri`` -> bytes (fsspec, retried) -> upright RGB ->
   resized to ``short_side`` -> ``pixels`` (raw bytes of ``(rh, rw, 3) uint8``), ``width``/``height``
   (upright original size), ``status``/``error``.
2. :class:`SegmentWorker` (actor pool; each actor holds one ``rfclip.Segmenter``): ``pixels`` ->
   ``labels`` (raw bytes of ``(height, width)`` uint8 or uint16), ``mean_confidence``.
3. :func:`encode_stage` (CPU tasks): ``labels`` -> ``mask_png``, ``class_pixels`` (bytes of ``(K,)
   int64``; b"" on error rows), + a palette mask file with --save-masks, + ``confusion`` (bytes of a
   ``(K, K) int64`` matrix) when a label is given.

Images travel between stages as raw bytes plus their shape rather than as ragged tensor columns,
so error rows (no pixels) and images of different sizes share one simple, fixed Arrow schema.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import warnings
from typing import Callable, Optional

import numpy as np

from rfclip.decode import DecodeError, decode_image, max_file_bytes
from .metrics import confusion_matrix
from .storage import atomic_write_bytes, get_fs, raise_storage_fault, read_uris, register_secrets, scrub

log = logging.getLogger(__name__)

# Test hook: seconds to sleep per model batch, so a fault-injection test can act mid-run.
# Only read from the environment of the worker process; never set in production.
WORKER_DELAY_ENV = "RFCLIP_TEST_WORKER_DELAY_S"
# Test hook: a model process that gets a batch holding an image id that contains this text exits at once,
# as one killed by the kernel's OOM killer or a native crash does. Never set in production.
WORKER_CRASH_ENV = "RFCLIP_TEST_WORKER_CRASH_ON"


def label_dtype(num_classes: int) -> np.dtype:
    """uint8 for up to 256 classes, else uint16: the dtype of the ``labels`` column's bytes."""
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.uint16)


def _err(exc: BaseException) -> str:
    if isinstance(exc, DecodeError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"read failed: file not found: {scrub(str(exc))}"
    return f"read failed: {type(exc).__name__}: {scrub(str(exc))}"


# What a failed device says: CUDA's sticky errors, which leave the process's context unusable (not out of
# memory, nor a launch configuration a smaller image may not need).
_DEVICE_FAULTS = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
                  "illegal instruction", "uncorrectable ECC error", "hardware stack error")


def device_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is the device failing (an illegal memory access, a device-side assert), not the image:
    no later call in the process succeeds. Out of memory is not one: a smaller image may still fit."""
    return any(w in str(exc) for w in _DEVICE_FAULTS)


def decode_stage(batch: dict, *, storage_options: Optional[dict], max_pixels: int, short_side: int,
                 max_long_side: int) -> dict:
    """CPU stage: read, decode and resize each image of the batch; bad ones become error rows. Storage that
    can't be read, retries spent (:func:`pipeline.storage.storage_fault`), raises StorageError instead.

    Adds ``pixels`` (object array of bytes), ``rh``, ``rw`` (resized size, int32), ``width``,
    ``height`` (upright original size, int32), ``status``, ``error``, ``decode_ms`` (float32) and
    ``decode_pid`` (int64).
    """
    from rfclip.images import resize_short_side

    register_secrets(storage_options)      # this process's error rows are scrubbed of them, as the driver's logs
    uris = [str(u) for u in batch["image_uri"]]
    n = len(uris)
    out = dict(batch)
    pixels = np.empty(n, dtype=object)
    rh = np.zeros(n, np.int32); rw = np.zeros(n, np.int32)
    width = np.zeros(n, np.int32); height = np.zeros(n, np.int32)
    status = np.empty(n, dtype=object); error = np.empty(n, dtype=object)
    decode_ms = np.zeros(n, np.float32)

    listed = [str(e) for e in batch.get("listing_error", [""] * n)]    # found unreadable when listed
    t0 = time.perf_counter()
    readable = [i for i in range(n) if not listed[i]]
    got: list = [DecodeError(e) for e in listed]
    # One byte past the most an image of max_pixels needs: decode_image refuses such a file unread.
    for i, data in zip(readable, read_uris([uris[i] for i in readable], storage_options,
                                           limit=max_file_bytes(max_pixels) + 1)):
        # A file that can't be read becomes an error row; storage that can't be read fails the batch, so the
        # job stops with its shard uncommitted and a re-run reads the image again.
        if isinstance(data, BaseException):
            raise_storage_fault(uris[i], data)
        got[i] = data
    read_ms = (time.perf_counter() - t0) * 1000.0 / max(n, 1)
    for i, data in enumerate(got):
        t1 = time.perf_counter()
        pixels[i] = b""
        try:
            if isinstance(data, BaseException):
                raise data
            got[i] = None                       # the file's bytes go once decoded
            rgb = decode_image(data, max_pixels=max_pixels)
            del data
            height[i], width[i] = rgb.shape[:2]
            small = np.ascontiguousarray(resize_short_side(rgb, short_side, max_long_side))
            rh[i], rw[i] = small.shape[:2]
            pixels[i] = small.tobytes()
            status[i], error[i] = "ok", None
        except Exception as exc:  # noqa: BLE001 - every failure becomes this image's error row
            status[i], error[i] = "error", _err(exc)
        decode_ms[i] = read_ms + (time.perf_counter() - t1) * 1000.0
    out.update(pixels=pixels, rh=rh, rw=rw, width=width, height=height, status=status, error=error,
               decode_ms=decode_ms, decode_pid=np.full(n, os.getpid(), np.int64))
    return out


class SegmentWorker:
    """Model stage: one ``rfclip.Segmenter`` per actor, built once in ``__init__``.

    ``__call__`` takes a decoded batch and returns it without ``pixels``, plus ``labels`` (bytes of
    ``(height, width)`` :func:`label_dtype`), ``mean_confidence`` (float32, NaN on error rows) and
    ``segment_ms`` (float32, the batch's model time shared equally by its ok images),
    ``model_pid`` (int64; compared with ``decode_pid`` to prove decoding ran elsewhere) and ``execution``
    (JSON of ``Segmenter.execution()`` after the batch: the plan and kernels that ran, and any fallbacks).
    """

    def __init__(self, segmenter_kwargs: dict):
        import rfclip

        with warnings.catch_warnings():
            # The driver's probe Segmenter, built from the same arguments, has shown these (settings the
            # method does not use, the weights' unstated choices) once; every actor would repeat them.
            warnings.simplefilter("ignore", UserWarning)
            self.seg = rfclip.Segmenter(**segmenter_kwargs)
        self.dtype = label_dtype(self.seg.num_classes)
        self.delay_s = float(os.environ.get(WORKER_DELAY_ENV, "0") or 0)

    def _segment(self, images: list, sizes: list) -> list:
        return self.seg.segment_batch(images, original_sizes=sizes)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["image_uri"])
        out = {k: v for k, v in batch.items() if k != "pixels"}
        labels = np.empty(n, dtype=object)
        labels[:] = [b""] * n
        conf = np.full(n, np.nan, np.float32)
        seg_ms = np.zeros(n, np.float32)
        status = np.array(batch["status"], dtype=object)
        error = np.array(batch["error"], dtype=object)
        ok = [i for i in range(n) if status[i] == "ok"]
        if self.delay_s:
            time.sleep(self.delay_s)
        crash_on = os.environ.get(WORKER_CRASH_ENV)
        if crash_on and any(crash_on in str(i) for i in batch["image_id"]):
            os._exit(137)
        if ok:
            images = [np.frombuffer(batch["pixels"][i], np.uint8).reshape(int(batch["rh"][i]), int(batch["rw"][i]), 3)
                      .copy() for i in ok]  # writable: torch.from_numpy warns on read-only buffers
            sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in ok]
            t0 = time.perf_counter()
            try:
                preds = self._segment(images, sizes)
                results = list(zip(ok, preds, [None] * len(ok)))
            except Exception as exc:  # noqa: BLE001 - isolate the failing image(s), logged below
                log.warning("segment_batch failed on a batch of %d (%s); retrying image by image", len(ok), exc)
                results = []
                for i, img, size in zip(ok, images, sizes):
                    try:
                        results.append((i, self._segment([img], [size])[0], None))
                    except Exception as exc1:  # noqa: BLE001 - this image's error row, unless the device failed
                        if device_fault(exc1):
                            # Not this image's fault, and every later call in this process fails too: the
                            # batch fails, the job stops with its shard uncommitted, and a re-run redoes it.
                            raise
                        results.append((i, None, exc1))
            per = (time.perf_counter() - t0) * 1000.0 / len(ok)
            for i, pred, exc in results:
                seg_ms[i] = per
                if exc is not None:
                    status[i], error[i] = "error", f"segmentation failed: {type(exc).__name__}: {scrub(str(exc))}"
                    continue
                lab = np.asarray(pred.labels)
                if lab.shape != (int(batch["height"][i]), int(batch["width"][i])):
                    status[i], error[i] = "error", f"segmenter returned labels of shape {lab.shape}"
                    continue
                labels[i] = lab.astype(self.dtype).tobytes()
                conf[i] = float(np.mean(pred.confidence, dtype=np.float64))
        execution = np.empty(n, dtype=object)
        execution[:] = [json.dumps(self.seg.execution(), sort_keys=True)] * n
        out.update(labels=labels, mean_confidence=conf, segment_ms=seg_ms, status=status, error=error,
                   model_pid=np.full(n, os.getpid(), np.int64), execution=execution)
        return out


def encode_stage(batch: dict, *, num_classes: int, output_uri: str, storage_options: Optional[dict],
                 save_masks: bool, decode_label: Optional[Callable] = None,
                 label_storage_options: Optional[dict] = None, ignore_index: int = 255,
                 background_first: bool = True) -> dict:
    """CPU stage: label bytes -> ``mask_png`` + ``class_pixels`` (+ masks/<image_id>.png, + confusion).

    ``background_first``: whether the masks draw class 0 black (``rfclip.visualize.first_is_background``).

    With ``decode_label`` (``bytes -> (H, W) int64`` in class-index space, ignored pixels ==
    ``ignore_index``), rows with a ``label_uri`` get ``confusion``: bytes of a ``(K, K) int64``
    matrix (rows: ground truth, columns: prediction); a label that can't be read or doesn't match
    the image size turns the row into an error row (never a silently skipped image).
    """
    from .sinks import MASKS_DIR, encode_label_png, palette_png

    register_secrets(storage_options)
    register_secrets(label_storage_options)
    n = len(batch["image_uri"])
    dt = label_dtype(num_classes)
    out = {k: v for k, v in batch.items() if k != "labels"}
    mask_png = np.empty(n, dtype=object)
    class_pixels = np.empty(n, dtype=object)
    confusion = np.empty(n, dtype=object)
    status = np.array(batch["status"], dtype=object)
    error = np.array(batch["error"], dtype=object)
    elapsed = (np.asarray(batch["decode_ms"], np.float32) + np.asarray(batch["segment_ms"], np.float32))
    out_fs = out_root = None
    if save_masks:
        out_fs, out_root = get_fs(output_uri, storage_options)
    labelled = decode_label is not None and "label_uri" in batch
    if labelled:
        label_uris = [batch["label_uri"][i] for i in range(n)]
        want = [i for i in range(n) if status[i] == "ok" and label_uris[i]]
        label_bytes = dict(zip(want, read_uris([str(label_uris[i]) for i in want], label_storage_options)))
        for i, data in label_bytes.items():                      # as in decode_stage
            if isinstance(data, BaseException):
                raise_storage_fault(str(label_uris[i]), data)
    for i in range(n):
        mask_png[i] = b""
        class_pixels[i] = b""
        confusion[i] = b""
        mask = posixpath.join(out_root, MASKS_DIR, f"{batch['image_id'][i]}.png") if save_masks else None
        if status[i] != "ok":
            if mask:                    # a row that was ok in a shard --retry-errors runs again: no mask now
                _remove_mask(out_fs, mask)
            continue
        h, w = int(batch["height"][i]), int(batch["width"][i])
        lab = np.frombuffer(batch["labels"][i], dt).reshape(h, w)
        if labelled and batch["label_uri"][i]:
            try:
                confusion[i] = _confusion_bytes(label_bytes[i], decode_label, lab, num_classes, ignore_index)
            except Exception as exc:  # noqa: BLE001 - the row records why it can't be scored
                status[i], error[i] = "error", f"label failed: {type(exc).__name__}: {scrub(str(exc))}"
                if mask:
                    _remove_mask(out_fs, mask)
                continue
        mask_png[i] = encode_label_png(lab, num_classes)
        class_pixels[i] = np.bincount(lab.ravel(), minlength=num_classes).astype(np.int64).tobytes()
        if mask:
            # Not flushed to disk one by one: an fsync per mask costs ten times the write on a local disk
            # (0.44 against 0.04 ms here) and far more on network ones. A mask is a copy of its row's
            # mask_png, whose shard commit is flushed; a killed process still never leaves a partial mask.
            atomic_write_bytes(out_fs, mask, palette_png(lab, num_classes, background_first), durable=False)
    out.update(mask_png=mask_png, class_pixels=class_pixels, confusion=confusion, status=status,
               error=error, elapsed_ms=elapsed)
    return out


def _remove_mask(fs, path: str) -> None:
    """Remove an error row's mask where an earlier run of its shard wrote one (``--retry-errors``)."""
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def _confusion_bytes(data, decode_label: Callable, pred: np.ndarray, num_classes: int, ignore_index: int) -> bytes:
    """The ``(K, K) int64`` confusion matrix of ``pred`` ``(H, W)`` against the label file's ``data`` (its
    bytes, or the exception reading it raised), as bytes; raises if the label can't be read or its size
    is not the image's."""
    if isinstance(data, BaseException):
        raise data
    gt = np.asarray(decode_label(data))
    if gt.shape != pred.shape:
        raise ValueError(f"label size {gt.shape[::-1]} != image size {pred.shape[::-1]}")
    return np.asarray(confusion_matrix(pred.astype(np.int64), gt, num_classes, ignore_index), dtype=np.int64).tobytes()
