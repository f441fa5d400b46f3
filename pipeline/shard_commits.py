"""Rows to committed shards: the driver's end of the pipeline.

Rows reach the driver in any order. :class:`ShardAssembler` buffers them by shard, drops any duplicate,
and commits a shard (:func:`commit_rows`, through ``sinks.commit_shard``) as soon as its last row
arrives: the shard's rows in input order, its metadata (``ok``/``error`` counts, what ran), and its
confusion matrix when the inputs are labelled.
"""
from __future__ import annotations

import json
import logging
from typing import Callable

import numpy as np

from . import run_record, sinks, storage
from .job_config import JobConfig, LabelError

log = logging.getLogger("segment_dataset")


class ShardAssembler:
    """Buffers a window's rows by shard and commits each shard once, whole.

    ``shards``: the window's :class:`~pipeline.sources.Shard` objects. ``counts`` (``ok``, ``error``,
    ``duplicates_dropped``, ``decoded_in_model_process``) and ``executions`` (JSON of each distinct
    ``Segmenter.execution()``) are added to. ``on_row()`` runs for each row kept, ``on_commit(shard)``
    after each commit.
    """

    def __init__(self, cfg: JobConfig, shards: list, config_sha256: str, num_classes: int, counts: dict,
                 executions: set, on_row: Callable[[], None] = lambda: None,
                 on_commit: Callable[[object], None] = lambda shard: None):
        self.cfg, self.config_sha256, self.num_classes = cfg, config_sha256, num_classes
        self.counts, self.executions = counts, executions
        self.on_row, self.on_commit = on_row, on_commit
        self.by_index = {s.index: s for s in shards}
        self.buffers: dict[int, dict[int, dict]] = {}     # shard index -> position -> row
        self.done: set[int] = set()                       # indices of the shards committed

    def take(self, r: dict) -> None:
        """Keep one row (``shard`` and ``pos`` say where it belongs); commit its shard when that is whole."""
        si, pos = int(r["shard"]), int(r["pos"])
        if si in self.done or pos in self.buffers.get(si, {}):
            self.counts["duplicates_dropped"] += 1
            log.warning("duplicate row for %s (shard %d) dropped", r["image_uri"], si)
            return
        buf = self.buffers.setdefault(si, {})
        buf[pos] = r
        self.on_row()
        if int(r["decode_pid"]) == int(r["model_pid"]):
            self.counts["decoded_in_model_process"] += 1
        shard = self.by_index[si]
        if len(buf) == len(shard.items):
            commit_rows(self.cfg, shard, self.buffers.pop(si), self.config_sha256, self.num_classes, self.counts,
                        self.executions)
            self.done.add(si)
            self.on_commit(shard)

    def missing(self, rows: list) -> list:
        """The rows of ``rows`` (``shard``, ``pos``) that have not arrived."""
        return [r for r in rows if r["shard"] not in self.done and r["pos"] not in self.buffers.get(r["shard"], {})]

    def any_arrived(self) -> bool:
        """Whether any row arrived (in a shard buffered or committed)."""
        return bool(self.buffers or self.done)

    def incomplete(self) -> list[int]:
        """Indices of the shards not committed."""
        return sorted(set(self.by_index) - self.done)


def lost_row(r: dict, cause: str) -> dict:
    """The error row of an image whose process died every time it was segmented, alone or not."""
    reason = (f"failed: the process handling this image died on every try, with it alone in its batch (killed "
              f"for memory? a native crash?), last as {cause}; see the Ray worker logs")
    return {**r, "width": 0, "height": 0, "status": "error", "error": r["listing_error"] or reason,
            "mask_png": b"", "class_pixels": b"", "confusion": b"", "mean_confidence": np.nan, "elapsed_ms": 0.0,
            "decode_pid": -1, "model_pid": -2, "execution": ""}


def to_parquet_row(r: dict) -> dict:
    """A row of ``sinks.PREDICTION_SCHEMA`` from one row of the encode stage (numpy scalars and bytes)."""
    ok = r["status"] == "ok"
    cp = r["class_pixels"]
    return {
        "image_uri": str(r["image_uri"]),
        "image_id": str(r["image_id"]),
        "width": int(r["width"]) if int(r["width"]) > 0 else None,
        "height": int(r["height"]) if int(r["height"]) > 0 else None,
        "status": "ok" if ok else "error",
        "error": None if ok else str(r["error"]),
        "mask_png": bytes(r["mask_png"]) if ok else None,
        "class_pixels": np.frombuffer(bytes(cp), np.int64).tolist() if ok else None,
        "mean_confidence": float(r["mean_confidence"]) if ok else None,
        "elapsed_ms": float(r["elapsed_ms"]),
    }


def commit_rows(cfg: JobConfig, shard, rows_by_pos: dict, config_sha256: str, num_classes: int, counts: dict,
                executions: set) -> None:
    """Write one shard whole (its rows in input order, its metadata, and its confusion matrix when labelled)."""
    rows = [rows_by_pos[p] for p in range(len(shard.items))]
    for p, r in enumerate(rows):  # the row must be the image the shard expects at that position
        if str(r["image_uri"]) != shard.items[p]["image_uri"]:
            raise RuntimeError(f"{shard.name}[{p}]: got {r['image_uri']!r}, expected {shard.items[p]['image_uri']!r}")
    if cfg.labels is not None:
        for r in rows:
            if r["status"] != "ok" and str(r["error"]).startswith("label failed"):
                raise LabelError(
                    f"label {storage.scrub(str(r.get('label_uri')))} of {storage.scrub(str(r['image_uri']))}: "
                    f"{r['error']}. An evaluation stops here rather than leave the image out of the metrics. "
                    f"Fix the label file and run the same command again (the shards committed so far are "
                    f"kept, this one is not); a different --ignore-index needs --overwrite once shards are "
                    f"committed")
    out_rows = [to_parquet_row(r) for r in rows]
    ran = sorted({str(r["execution"]) for r in rows if str(r["execution"])})   # "": a row no worker returned
    executions.update(ran)
    ok = sum(r["status"] == "ok" for r in out_rows)
    confusion = None
    if cfg.labels is not None:
        m = np.zeros((num_classes, num_classes), np.int64)
        for r in rows:
            if r["status"] == "ok" and len(r["confusion"]):
                m += np.frombuffer(bytes(r["confusion"]), np.int64).reshape(num_classes, num_classes)
        confusion = {"num_classes": num_classes, "ignore_index": cfg.labels.ignore_index,
                     "images": int(sum(1 for r in rows if r["status"] == "ok" and len(r["confusion"]))),
                     "matrix": m.tolist()}
    meta = {"name": shard.name, "index": shard.index, "digest": shard.digest, "num_rows": len(rows),
            "ok": ok, "error": len(rows) - ok,
            "config_sha256": config_sha256,
            # how the model ran for these rows: device, plan, kernels, and the fallbacks their worker had taken
            # so far (one entry per distinct state)
            "execution": [json.loads(e) for e in ran],
            "committed_at": run_record.now()}
    sinks.commit_shard(cfg.output, cfg.storage_options, shard.name, out_rows, meta, confusion)
    counts["ok"] += ok
    counts["error"] += len(rows) - ok
