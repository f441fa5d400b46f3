"""Confusion matrices per image, their reduction over committed shards, metrics.json / metrics.md.

Public API::

    cm = confusion_matrix(pred, gt, num_classes, ignore_index)   # (K, K) int64, rows = ground truth
    result = reduce_confusion(output_uri, storage_options=None, class_names=None, extra=None) -> dict
        # sums the K x K matrices of every committed shard (predictions/shard-*.parquet footers,
        # written by pipeline.sinks.commit_shard), writes {output}/metrics.json, {output}/metrics.md
        # and {output}/metrics/confusion.npy, returns the metrics.json content
    summarize(cm, class_names, images) -> dict                   # the metrics.json content alone

Numbers follow MMSegmentation's IoUMetric: ignored pixels are dropped; over the whole dataset
``IoU_c = TP / (TP + FP + FN)`` and ``Acc_c = TP / (TP + FN)``; mIoU / mAcc are nanmeans over the
classes; aAcc = trace / total; all in percent. A class with union 0 (absent from prediction and
ground truth) has IoU null; a class absent from the ground truth has Acc null.

Shards are committed whole under deterministic names, so a resumed run redoes or skips a shard but
never adds it twice; the reducer also refuses an image that appears (ok) in two shards.
"""
from __future__ import annotations

import io
import json
import math
import posixpath
from typing import Optional, Sequence

import numpy as np

from .storage import atomic_write_bytes, get_fs

def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_index: int = 255) -> np.ndarray:
    """``(K, K) int64`` counts, ``cm[g, p]`` = pixels with ground truth g predicted as p.

    pred, gt: ``(H, W)`` integer arrays of the same shape. Pixels where gt == ignore_index are
    dropped. Raises on other gt values outside [0, K) and on pred values outside [0, K).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    k = int(num_classes)
    keep = gt != ignore_index
    g = gt[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= k):
        raise ValueError(f"ground-truth values outside [0, {k}) besides ignore {ignore_index}: "
                         f"{np.unique(g[(g < 0) | (g >= k)])[:10].tolist()}")
    if p.size and (p.min() < 0 or p.max() >= k):
        raise ValueError(f"prediction values outside [0, {k}): "
                         f"{np.unique(p[(p < 0) | (p >= k)])[:10].tolist()}")
    return np.bincount(k * g + p, minlength=k * k).reshape(k, k).astype(np.int64)


def _nan_to_none(x: float) -> Optional[float]:
    return None if math.isnan(x) else float(x)


def summarize(cm: np.ndarray, class_names: Sequence[str], images: int) -> dict:
    """metrics.json content for a ``(K, K) int64`` matrix; percentages, NaN written as null."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    gt_total = cm.sum(axis=1).astype(np.float64)
    pred_total = cm.sum(axis=0).astype(np.float64)
    union = gt_total + pred_total - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / union
        acc = tp / gt_total
    total = cm.sum()
    miou = float(np.nanmean(iou)) * 100 if np.isfinite(iou).any() else float("nan")
    macc = float(np.nanmean(acc)) * 100 if np.isfinite(acc).any() else float("nan")
    aacc = float(tp.sum() / total) * 100 if total else float("nan")
    return {
        "images": int(images),
        "pixels": int(total),
        "num_classes": int(cm.shape[0]),
        "mIoU": _nan_to_none(miou),
        "mAcc": _nan_to_none(macc),
        "aAcc": _nan_to_none(aacc),
        "classes": [{"name": n, "iou": _nan_to_none(float(i) * 100), "acc": _nan_to_none(float(a) * 100)}
                    for n, i, a in zip(class_names, iou, acc)],
    }


def _fmt(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}"


def md_cell(text: object) -> str:
    """``text`` as one Markdown table cell: a ``|`` in a class name would start another column."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def metrics_markdown(result: dict, title: str = "Evaluation") -> str:
    """metrics.md: the summary line and a per-class table (IoU / Acc in percent, – = absent)."""
    failed = result.get("images_failed") or 0
    lines = [f"# {title}", "",
             f"{result['images']} images, {result['num_classes']} classes, "
             f"{result['pixels']} evaluated pixels.", ""]
    if failed:
        lines += [f"**{failed} images could not be segmented and are not scored** (their rows in predictions/ "
                  f"say why), e.g.:", ""] + [f"- {e}" for e in result.get("failed_examples", [])] + [""]
    lines += [
             "| aAcc | mIoU | mAcc |", "|---|---|---|",
             f"| {_fmt(result['aAcc'])} | {_fmt(result['mIoU'])} | {_fmt(result['mAcc'])} |", "",
             "| class | IoU | Acc |", "|---|---|---|"]
    lines += [f"| {md_cell(c['name'])} | {_fmt(c['iou'])} | {_fmt(c['acc'])} |" for c in result["classes"]]
    lines += ["", "IoU – : class absent from both prediction and ground truth (left out of mIoU); "
              "Acc – : class absent from the ground truth (left out of mAcc).", ""]
    return "\n".join(lines)


def load_shard_confusions(output_uri: str, storage_options: Optional[dict] = None) -> dict:
    """Sum of every committed shard's matrix: ``{"confusion": (K, K) int64, "images": int,
    "images_failed": int, "failed_examples": [str], "ignore_index": int, "shards": int}``
    (``images_failed``: rows that could not be segmented, hence not scored; up to 5 of their
    ``uri: reason``). Raises on no shards, a shard without a matrix, differing sizes / ignore
    indices, or an image counted in two shards."""
    from .sinks import committed_shard_files, parse_shard_metadata, read_shard

    files, fs = committed_shard_files(output_uri, storage_options or {})
    total, images, ignore, seen, failed = None, 0, None, set(), []
    for path in files:
        name = posixpath.basename(path)[: -len(".parquet")]
        t = read_shard(fs, path, ["image_uri", "status", "error"])
        _, conf = parse_shard_metadata(t.schema.metadata)
        if conf is None:
            raise ValueError(f"shard {name} has no confusion matrix (a run without labels?)")
        m = np.asarray(conf["matrix"], dtype=np.int64)
        if total is not None and m.shape != total.shape:
            raise ValueError(f"shard {name}: confusion matrix {m.shape} != {total.shape}")
        if ignore is not None and conf["ignore_index"] != ignore:
            raise ValueError(f"shard {name}: ignore_index {conf['ignore_index']} != {ignore}")
        ignore = conf["ignore_index"]
        ok = [u for u, st in zip(t.column("image_uri").to_pylist(), t.column("status").to_pylist()) if st == "ok"]
        dup = seen.intersection(ok)
        if dup:
            raise ValueError(f"{len(dup)} images counted in two shards, e.g. {sorted(dup)[:3]}")
        seen.update(ok)
        failed += [f"{u}: {e}" for u, st, e in zip(t.column("image_uri").to_pylist(), t.column("status").to_pylist(),
                                                  t.column("error").to_pylist()) if st != "ok"]
        total = m if total is None else total + m
        images += int(conf["images"])
    return {"confusion": total, "images": images, "images_failed": len(failed), "failed_examples": failed[:5],
            "ignore_index": ignore, "shards": len(files)}


def _class_names_from_run(output_uri: str, so: dict) -> Optional[list]:
    """run.json's class names, or None without a run.json; a damaged one raises, saying so."""
    from .outputs import names_in_run
    from .sinks import RUN_JSON, read_json

    run = read_json(output_uri, so, RUN_JSON)
    return None if run is None else names_in_run(run)


def reduce_confusion(output_uri: str, storage_options: Optional[dict] = None,
                     class_names: Optional[Sequence[str]] = None, extra: Optional[dict] = None) -> dict:
    """Sum the committed shards under ``output_uri``, write metrics.json / metrics.md there, return
    the dict. Class names: ``class_names``, else run.json's. ``extra`` (benchmark, method, ...) is
    merged into metrics.json. Also writes ``metrics/confusion.npy`` (``(K, K) int64``) for the report.
    """
    so = storage_options or {}
    total = load_shard_confusions(output_uri, so)
    cm = total["confusion"]
    names = list(class_names) if class_names is not None else _class_names_from_run(output_uri, so)
    if names is None or len(names) != cm.shape[0]:
        raise ValueError(f"need {cm.shape[0]} class names, got {None if names is None else len(names)}")
    result = summarize(cm, names, total["images"])
    result.update(ignore_index=total["ignore_index"], images_failed=total["images_failed"],
                  failed_examples=total["failed_examples"])
    if extra:
        clash = set(extra) & set(result)
        if clash:
            raise ValueError(f"extra keys clash with metrics keys: {sorted(clash)}")
        result = {**extra, **result}
    fs, root = get_fs(output_uri, so)
    root = root.rstrip("/")
    title = " / ".join(str(extra[k]) for k in ("benchmark", "method") if extra and k in extra)
    buf = io.BytesIO()
    np.save(buf, cm)
    atomic_write_bytes(fs, posixpath.join(root, "metrics", "confusion.npy"), buf.getvalue())
    atomic_write_bytes(fs, posixpath.join(root, "metrics.json"), json.dumps(result, indent=2).encode())
    atomic_write_bytes(fs, posixpath.join(root, "metrics.md"),
                       metrics_markdown(result, f"Evaluation {title}".strip()).encode())
    return result
