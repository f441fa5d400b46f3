"""Reading a job's output back: the predictions table, the class names, the label maps.

For users of the pseudo-labels (``pipeline.sinks`` writes them)::

    from pipeline.outputs import class_names, iter_labels, read_predictions

    names = class_names("out/samples")                      # ["sky", "road", "car"]
    table = read_predictions("out/samples", columns=["image_uri", "status", "error"])
    for image_id, image_uri, labels in iter_labels("out/samples"):
        ...                                                 # labels: (H, W) int64 class indices into names

Only committed shards are read (never the temp files of an interrupted commit), so this works on the
output of an unfinished run too: it gives the images committed so far.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
from rfclip.visualize import decode_label_png

from .sinks import PREDICTION_SCHEMA, RUN_JSON, committed_shard_files, read_json, read_shard
from .storage import scrub

OK = "ok"


def class_names(output_uri: str, storage_options: Optional[dict] = None) -> list[str]:
    """The names of the classes that the label maps index, in order, from ``run.json``: a labelled run's
    class names (its benchmark's or its labels'), else the vocabulary's (each class's first synonym).
    ``FileNotFoundError`` when the output has no run.json (not a job's output); ``ValueError`` when it is
    damaged or names no classes."""
    run = read_json(output_uri, storage_options or {}, RUN_JSON)
    if run is None:
        raise FileNotFoundError(f"no {RUN_JSON} under {scrub(output_uri)}: not the output of jobs/segment_dataset.py")
    names = names_in_run(run)
    if not names:
        raise ValueError(f"{RUN_JSON} under {scrub(output_uri)} names no classes (runtime.class_names)")
    return names


def names_in_run(run: dict) -> Optional[list[str]]:
    """The class names a parsed run.json records (:func:`class_names`), or None."""
    labels = (run.get("config") or {}).get("labels") or {}
    names = labels.get("class_names") or (run.get("runtime") or {}).get("class_names")
    return list(names) if names else None


def read_predictions(output_uri: str, storage_options: Optional[dict] = None,
                     columns: Optional[Sequence[str]] = None) -> pa.Table:
    """The committed rows of every shard, in shard order, as one table (``PREDICTION_SCHEMA``; ``columns``
    picks some, or one by its name). Leave ``mask_png`` out where it is not needed: it is most of the bytes.
    ``FileNotFoundError`` when no shard is committed; ``ValueError`` for an unknown column or a shard
    damaged after its commit; ``PermissionError`` or ``pipeline.storage.StorageError`` where a shard can't
    be read (access, an outage past the retries)."""
    cols = [columns] if isinstance(columns, str) else list(columns) if columns is not None else PREDICTION_SCHEMA.names
    unknown = [c for c in cols if c not in PREDICTION_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown columns {unknown}; the predictions have {PREDICTION_SCHEMA.names}")
    files, fs = committed_shard_files(output_uri, storage_options or {})
    tables = [read_shard(fs, f, cols).replace_schema_metadata(None) for f in files]
    return pa.concat_tables(tables)


def iter_labels(output_uri: str, storage_options: Optional[dict] = None) -> Iterator[tuple[str, str, np.ndarray]]:
    """``(image_id, image_uri, labels)`` of every image segmented without error, one shard in memory at a
    time; ``labels`` is ``(H, W) int64`` at the image's upright size, indices into :func:`class_names`.
    Error rows are skipped (``read_predictions`` lists them with their reason)."""
    files, fs = committed_shard_files(output_uri, storage_options or {})
    for f in files:
        cols = ["image_id", "image_uri", "status", "mask_png"]
        t = read_shard(fs, f, cols)
        for image_id, uri, status, png in zip(*(t.column(c).to_pylist() for c in cols)):
            if status == OK:
                yield image_id, uri, decode_label_png(png)
