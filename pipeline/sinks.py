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
import posixpath
import re
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rfclip.visualize import label_png

from .storage import atomic_write_bytes, get_fs, is_local, redact, scrub

PREDICTIONS_DIR = "predictions"
MASKS_DIR = "masks"
RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"

# Everything the job writes under --output (what --overwrite removes; any other file stays): these files,
# plus the files of these folders whose names match (pipeline.report writes figures/, pipeline.metrics the
# metrics files), plus the temp files of interrupted atomic writes (storage.atomic_write_bytes).
JOB_FILES = (RUN_JSON, SUMMARY_JSON, "report.md", "metrics.json", "metrics.md", "metrics/confusion.npy")
JOB_FOLDERS = {PREDICTIONS_DIR: r"shard-\d{5}\.parquet", MASKS_DIR: r".+-[0-9a-f]{10}\.png",
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


def palette_png(labels: np.ndarray, num_classes: int) -> bytes:
    """A viewable mask for ``masks/``: VOC-palette PNG (16-bit gray beyond 256 classes)."""
    return label_png(labels, num_classes, colours=True)


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
    if not fs.exists(folder):
        return set()
    names = set()
    fs.invalidate_cache(folder)  # listings are cached by s3fs; a resume must see the latest commits
    for p in fs.ls(folder, detail=False):
        base = posixpath.basename(p)
        if base.startswith("shard-") and base.endswith(".parquet"):
            names.add(base[: -len(".parquet")])
    return names


# Threads that read shard footers at once on a resume: each read is a round trip or two to the store.
FOOTER_READERS = 16


def read_committed_footers(output_uri: str, storage_options: Optional[dict]) -> tuple[dict, dict]:
    """``(metas, damaged)`` of the shards committed under ``output_uri``, from their Parquet footers.

    ``metas``: name -> the shard's metadata (``rfclip.shard``: digest, num_rows, ok, error, ...), with
    ``num_rows`` checked against the footer's row count. ``damaged``: name -> why the footer can't be
    read (a file truncated or overwritten after its commit, as by an interrupted copy). A commit is all
    or nothing, so a damaged shard was harmed afterwards, and a resume redoes it.

    Only footers are read (the tail of each file). A thread pool reads them, as fsspec has no batched
    footer read; local files and object stores both take small ranged reads.
    """
    from concurrent.futures import ThreadPoolExecutor

    fs, root = get_fs(output_uri, storage_options)
    names = sorted(committed_shard_names(output_uri, storage_options))

    def footer(name: str):
        path = posixpath.join(root, shard_path(name))
        try:
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                rows, metadata = pf.metadata.num_rows, pf.schema_arrow.metadata
            meta, _ = parse_shard_metadata(metadata)
            if int(meta.get("num_rows", -1)) != rows:
                raise ValueError(f"its metadata says {meta.get('num_rows')} rows and the file holds {rows}")
            return meta, None
        except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as exc:
            return None, f"{type(exc).__name__}: {scrub(str(exc))[:200]}"

    metas, damaged = {}, {}
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
    """``columns`` of a committed shard, and its key-value metadata, in one read. A shard that can't be
    read was damaged after its commit (a commit is all or nothing): the error says how to redo it."""
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=list(columns))
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"committed shard {path} can't be read ({type(exc).__name__}: {scrub(str(exc))}); it was "
                         f"damaged after its commit: delete it and run the same command again to redo it") from exc


def parse_shard_metadata(metadata: Optional[dict]) -> tuple[dict, Optional[dict]]:
    """``(shard_meta, confusion or None)`` from a shard's key-value metadata (a pyarrow schema's)."""
    meta = metadata or {}
    conf = json.loads(meta[META_CONFUSION]) if META_CONFUSION in meta else None
    return json.loads(meta[META_SHARD]), conf


def write_json(output_uri: str, storage_options: Optional[dict], name: str, obj: dict) -> None:
    """Atomically write ``obj`` (credentials redacted) as ``<output>/<name>``."""
    fs, root = get_fs(output_uri, storage_options)
    data = json.dumps(redact(obj), indent=2, sort_keys=True, default=str).encode()
    atomic_write_bytes(fs, posixpath.join(root, name), data)


def read_json(output_uri: str, storage_options: Optional[dict], name: str) -> Optional[dict]:
    """``<output>/<name>`` parsed, or None if absent."""
    fs, root = get_fs(output_uri, storage_options)
    path = posixpath.join(root, name)
    if not fs.exists(path):
        return None
    try:
        doc = json.loads(fs.cat_file(path))
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
    for folder in (*JOB_FOLDERS, "metrics"):
        p = posixpath.join(root, folder)
        if is_local(fs) and fs.isdir(p) and not fs.ls(p):
            fs.rmdir(p)
