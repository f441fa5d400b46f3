"""Outputs of the job: Parquet prediction shards (atomic commits), run.json, summary.json, masks.

Layout under ``--output``::

    run.json                         configuration (first run; a resume must match it)
    predictions/shard-XXXXX.parquet  one row per input image (:data:`PREDICTION_SCHEMA`)
    masks/<image_id>.png             only with --save-masks (palette PNG)
    summary.json                     written once every shard is committed
    report.md, figures/, metrics*    written after summary.json (pipeline.evaluation)

A shard file is the commit: it appears whole (temp name + rename, or one object PUT) or not at
all. With labelled inputs, the shard's ``K x K`` int64 confusion matrix travels in the same file's
key-value metadata, so predictions and metrics are committed by one atomic write.
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rfclip.visualize import label_png

from .storage import StorageError, atomic_write_bytes, get_fs, is_local, redact, retry_call, scrub

log = logging.getLogger("segment_dataset")

PREDICTIONS_DIR = "predictions"
MASKS_DIR = "masks"
RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"

# Everything the job writes under --output (what --overwrite removes; any other file stays): these files,
# plus the files of these folders whose names match (pipeline.report writes figures/, pipeline.metrics the
# metrics files), plus the temp files of interrupted atomic writes (storage.atomic_write_bytes).
JOB_FILES = (RUN_JSON, SUMMARY_JSON, "report.md", "metrics.json", "metrics.md", "metrics/confusion.npy")
JOB_FOLDERS = {PREDICTIONS_DIR: r"shard-\d{5,}\.parquet", MASKS_DIR: r".+-(?:[0-9a-f]{10}|[0-9a-f]{20})\.png",
               "figures": r"(iou|confusion|samples|class_distribution|confidence)\.png"}
_TEMP_PREFIX = re.compile(r"\.tmp-[0-9a-f]{12}-")
META_SHARD = b"rfclip.shard"
META_CONFUSION = b"rfclip.confusion"

PREDICTION_SCHEMA = pa.schema([
    ("image_uri", pa.string()),
    ("image_id", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("status", pa.string()),               # "ok" | "error"
    ("error", pa.string()),                # reason; null when ok
    ("mask_png", pa.binary()),             # label map, 8-bit (K <= 256) or 16-bit PNG, upright size
    ("class_pixels", pa.list_(pa.int64())),  # length K
    ("mean_confidence", pa.float32()),
    ("elapsed_ms", pa.float32()),
])


def shard_path(name: str) -> str:
    """``predictions/<name>.parquet`` (relative to the output root)."""
    return posixpath.join(PREDICTIONS_DIR, f"{name}.parquet")


def encode_label_png(labels: np.ndarray, num_classes: int) -> bytes:
    """``(H, W)`` label map -> PNG bytes for ``mask_png``: 8-bit gray, 16-bit beyond 256 classes."""
    return label_png(labels, num_classes, colours=False)


def palette_png(labels: np.ndarray, num_classes: int, background: bool = True) -> bytes:
    """A viewable mask for ``masks/``: VOC-palette PNG (16-bit gray beyond 256 classes); ``background``:
    whether class 0 is drawn black (``rfclip.visualize.first_is_background``)."""
    return label_png(labels, num_classes, colours=True, background=background)


def rows_to_table(rows: Sequence[dict], shard_meta: dict, confusion: Optional[dict] = None) -> pa.Table:
    """Rows (dicts with the schema's columns) -> a table whose metadata records the shard (and confusion)."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in PREDICTION_SCHEMA}
    meta = {META_SHARD: json.dumps(shard_meta).encode()}
    if confusion is not None:
        meta[META_CONFUSION] = json.dumps(confusion).encode()
    return pa.table(cols, schema=PREDICTION_SCHEMA.with_metadata(meta))


def commit_shard(output_uri: str, storage_options: Optional[dict], name: str, rows: Sequence[dict],
                 shard_meta: dict, confusion: Optional[dict] = None) -> str:
    """Write ``predictions/<name>.parquet`` atomically; returns its path within the output fs."""
    table = rows_to_table(rows, shard_meta, confusion)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    fs, root = get_fs(output_uri, storage_options)
    path = posixpath.join(root, shard_path(name))
    atomic_write_bytes(fs, path, buf.getvalue().to_pybytes())
    return path


def committed_shard_names(output_uri: str, storage_options: Optional[dict]) -> set[str]:
    """Names (``shard-XXXXX``) of the shards already committed under ``output_uri``."""
    fs, root = get_fs(output_uri, storage_options)
    folder = posixpath.join(root, PREDICTIONS_DIR)

    def listing() -> list[str]:
        fs.invalidate_cache(folder)  # listings are cached by s3fs; a resume must see the latest commits
        return fs.ls(folder, detail=False) if fs.exists(folder) else []

    names = set()
    for p in retry_call(listing, f"list {folder}"):
        base = posixpath.basename(p)
        if base.startswith("shard-") and base.endswith(".parquet"):
            names.add(base[: -len(".parquet")])
    return names


# Threads that read shard footers at once on a resume: each read is a round trip or two to the store
# (s3fs pools 10 connections by default).
FOOTER_READERS = 8


class _ReadRecorder:
    """A file object over ``f`` that remembers the first exception a read raised: a footer that can't be
    parsed (the file is damaged) is told from one that can't be read (access, an outage), which pyarrow
    reports alike (``OSError``)."""

    def __init__(self, f):
        self._f, self.error = f, None

    def _call(self, name: str, *args):
        try:
            return getattr(self._f, name)(*args)
        except Exception as exc:  # noqa: BLE001 - recorded, and raised on
            self.error = self.error or exc
            raise

    def read(self, *args):
        return self._call("read", *args)

    def seek(self, *args):
        return self._call("seek", *args)

    def tell(self):
        return self._call("tell")

    @property
    def closed(self) -> bool:
        return self._f.closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


class _Damaged(Exception):
    """A shard's file was read and can't be parsed."""


def _read_parquet(fs, path: str, parse, what: str, advice: str):
    """``parse(file)`` of the Parquet file ``path``, with transient storage errors retried
    (:func:`~pipeline.storage.retry_call`). Raises :class:`_Damaged` where the file was read and can't be
    parsed, ``FileNotFoundError`` as it is, and for any other failure to read (no access, an outage past
    the retries) ``PermissionError`` or :class:`~pipeline.storage.StorageError`, saying
    ``can't read {what} {path} (...); {advice}``: pyarrow reports both kinds alike (``OSError``)."""
    def read():
        with fs.open(path, "rb") as f:
            src = _ReadRecorder(f)
            try:
                return parse(src)
            except Exception as exc:  # noqa: BLE001 - a read error is raised as it is, a parse error is damage
                if src.error is not None:
                    raise src.error from None
                raise _Damaged(f"{type(exc).__name__}: {scrub(str(exc))[:300]}") from None

    try:
        return retry_call(read, f"read {path}")
    except (_Damaged, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - storage, said with the file's name
        message = f"can't read {what} {scrub(path)} ({type(exc).__name__}: {scrub(str(exc))[:300]}); {advice}"
        raise (PermissionError(message) if isinstance(exc, PermissionError) else StorageError(message)) from exc


def read_committed_footers(output_uri: str, storage_options: Optional[dict], names: Optional[set] = None
                           ) -> tuple[dict, dict]:
    """``(metas, damaged)`` of the shards committed under ``output_uri`` (or of ``names`` among them), from
    their Parquet footers.

    ``metas``: name -> the shard's metadata (``rfclip.shard``: digest, num_rows, ok, error, ...), its
    ``num_rows`` checked against the footer's row count. ``damaged``: name -> why its footer can't be
    parsed (the file was cut short or overwritten after its commit, as by an interrupted copy, or is gone
    since the listing). A commit is all or nothing, so such a shard was harmed afterwards.

    Only footers are read, not the data pages, in a thread pool (fsspec has no batched footer read), with
    transient storage errors retried (:func:`~pipeline.storage.retry_call`). A footer that can't be read
    (no access, an outage that outlasts the retries) raises: ``PermissionError``, else
    :class:`~pipeline.storage.StorageError`; a shard is never counted as damaged for it.
    """
    from concurrent.futures import ThreadPoolExecutor

    fs, root = get_fs(output_uri, storage_options)
    names = sorted(committed_shard_names(output_uri, storage_options) if names is None else names)

    def parse(f) -> tuple[int, Optional[dict]]:
        pf = pq.ParquetFile(f)
        return pf.metadata.num_rows, pf.schema_arrow.metadata

    def footer(name: str) -> tuple[Optional[dict], Optional[str]]:
        """``(meta, None)``, or ``(None, why it is damaged)``; raises where the footer can't be read."""
        path = posixpath.join(root, shard_path(name))
        try:
            rows, metadata = _read_parquet(fs, path, parse, "the footer of committed shard",
                                           "nothing was changed: check access to the output and run the same "
                                           "command again")
        except FileNotFoundError:
            return None, "the file is gone since it was listed"
        except _Damaged as exc:
            return None, str(exc)
        try:
            meta, _ = parse_shard_metadata(metadata)
            if int(meta.get("num_rows", -1)) != rows:
                return None, f"its metadata says {meta.get('num_rows')} rows and the file holds {rows}"
        except (ValueError, KeyError, TypeError) as exc:          # rfclip.shard missing or not what it should be
            return None, f"{type(exc).__name__}: {scrub(str(exc))[:200]}"
        return meta, None

    metas, damaged = {}, {}
    # pool.map raises the first failure in order and cancels the reads not yet started, so an outage
    # costs one shard's retries, not every shard's.
    with ThreadPoolExecutor(max_workers=min(FOOTER_READERS, max(1, len(names)))) as pool:
        for name, (meta, why) in zip(names, pool.map(footer, names)):
            if meta is None:
                damaged[name] = why
            else:
                metas[name] = meta
    return metas, damaged


def committed_shard_files(output_uri: str, storage_options: Optional[dict]) -> tuple[list[str], object]:
    """The committed shards' paths, sorted (``predictions/shard-*.parquet``, not the temp files a crashed
    commit may leave), and their filesystem. Raises ``FileNotFoundError`` when there are none."""
    fs, root = get_fs(output_uri, storage_options)
    files = [posixpath.join(root, shard_path(name)) for name in sorted(committed_shard_names(output_uri, storage_options))]
    if not files:
        raise FileNotFoundError(f"no committed shards (predictions/shard-*.parquet) under {scrub(output_uri)}")
    return files, fs


def read_shard(fs, path: str, columns: Sequence[str]) -> pa.Table:
    """``columns`` of a committed shard, and its key-value metadata, in one read, with transient storage
    errors retried. A shard whose file can't be parsed was damaged after its commit (a commit is all or
    nothing): ``ValueError`` says how to redo it. One that can't be *read* (no access, an outage past the
    retries) raises ``PermissionError`` or :class:`~pipeline.storage.StorageError`: nothing is wrong with
    the file, so nothing says to delete it."""
    try:
        return _read_parquet(fs, path, lambda f: pq.read_table(f, columns=list(columns)), "committed shard",
                             "check access to the output and try again")
    except _Damaged as exc:
        raise ValueError(f"committed shard {scrub(path)} can't be read ({exc}); it was damaged after its commit: "
                         f"delete it and run the same command again to redo it") from None


def parse_shard_metadata(metadata: Optional[dict]) -> tuple[dict, Optional[dict]]:
    """``(shard_meta, confusion or None)`` from a shard's key-value metadata (a pyarrow schema's)."""
    meta = metadata or {}
    conf = json.loads(meta[META_CONFUSION]) if META_CONFUSION in meta else None
    shard = json.loads(meta[META_SHARD])
    if not isinstance(shard, dict):
        raise ValueError(f"the shard metadata is not a JSON object: {str(shard)[:80]}")
    return shard, conf


def write_json(output_uri: str, storage_options: Optional[dict], name: str, obj: dict) -> None:
    """Atomically write ``obj`` (credentials redacted) as ``<output>/<name>``."""
    fs, root = get_fs(output_uri, storage_options)
    data = json.dumps(redact(obj), indent=2, sort_keys=True, default=str).encode()
    atomic_write_bytes(fs, posixpath.join(root, name), data)


def read_json(output_uri: str, storage_options: Optional[dict], name: str) -> Optional[dict]:
    """``<output>/<name>`` parsed, or None if absent."""
    fs, root = get_fs(output_uri, storage_options)
    path = posixpath.join(root, name)
    data = retry_call(lambda: fs.cat_file(path) if fs.exists(path) else None, f"read {path}")
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{scrub(path)} is damaged ({exc}); run with --overwrite to start over") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{scrub(path)} is damaged (not a JSON object); run with --overwrite to start over")
    return doc


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable ``key: old -> new`` lines for every differing leaf of two config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, key + ".")
        elif a != b:
            sa, sb = json.dumps(a, default=str), json.dumps(b, default=str)
            out.append(f"{key}: {sa[:120]} -> {sb[:120]}")
    return out


def written_by_job(rel_path: str) -> bool:
    """True if ``rel_path`` (relative to the output) is a file the job writes: see :data:`JOB_FILES`."""
    folder, name = posixpath.split(rel_path)
    temp = _TEMP_PREFIX.match(name)
    name = name[temp.end():] if temp else name
    if folder in JOB_FOLDERS:
        return re.fullmatch(JOB_FOLDERS[folder], name) is not None
    return posixpath.join(folder, name) in JOB_FILES


def clear_outputs(output_uri: str, storage_options: Optional[dict]) -> None:
    """--overwrite: remove every file the job writes (:func:`written_by_job`), and no other file.

    Folders left empty are removed too (local disks; object stores have no folders).
    """
    fs, root = get_fs(output_uri, storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        return
    ours = [p for p in fs.find(root, maxdepth=2) if written_by_job(p[len(root):].lstrip("/"))]
    if ours:
        fs.rm(ours)
    log.info("--overwrite: removed %d files the job wrote under %s; other files are kept", len(ours), scrub(output_uri))
    for folder in (*JOB_FOLDERS, "metrics"):
        p = posixpath.join(root, folder)
        if is_local(fs) and fs.isdir(p) and not fs.ls(p):
            fs.rmdir(p)
