"""A human-readable report.md with PNG figures, for an evaluation or a pseudo-labelling run.

    write_report(output_uri, class_names, source=None, storage_options=None, num_samples=6,
                 title=None) -> str   # URI of {output}/report.md; figures in {output}/figures/

Inputs under ``output_uri``: ``predictions/*.parquet`` (columns image_uri, image_id, status,
mask_png, class_pixels, mean_confidence, ...). With ``source`` (a LabelledSource) the run is an
evaluation and ``metrics.json`` + ``metrics/confusion.npy`` (written by
:func:`pipeline.metrics.reduce_confusion`) must exist too. Evaluation report: per-class IoU bar
chart, confusion matrix heatmap (rows normalised per ground-truth class), sample grid (image,
prediction, ground truth, shared legend), worst-classes table. Pseudo-labelling report: class
distribution over the corpus, histogram of per-image mean confidence, grid of overlays.
"""
from __future__ import annotations

import io
import json
import logging
import posixpath
import sys
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from rfclip.visualize import class_palette, decode_label_png  # noqa: E402

from .metrics import _fmt, md_cell  # noqa: E402
from .sinks import committed_shard_files, read_shard  # noqa: E402
from .storage import atomic_write_bytes, get_fs, read_uris, scrub  # noqa: E402

log = logging.getLogger(__name__)

OK = "ok"
STAT_COLUMNS = ["status", "class_pixels", "mean_confidence"]
IGNORE_RGB = (224, 224, 192)     # VOC's colour for ignored pixels (its palette's index 255)


# ----------------------------------------------------------------------------- helpers

def colorize(labels: np.ndarray, pal: np.ndarray, ignore_index: Optional[int] = None) -> np.ndarray:
    """``(H, W)`` int class map -> ``(H, W, 3) uint8`` in the colours of the job's mask PNGs
    (``rfclip.visualize.palette``); ignored pixels ``IGNORE_RGB``, labels outside the palette black."""
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    if ignore_index is not None:
        out[labels == ignore_index] = IGNORE_RGB
    valid = (labels >= 0) & (labels < len(pal))
    if ignore_index is not None:
        valid &= labels != ignore_index
    out[valid] = pal[labels[valid]]
    return out


def _fig_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def corpus_stats(fs, files: Sequence[str], num_classes: int) -> dict:
    """Sums over the ok rows of every shard, read one shard at a time (the driver's memory does not grow
    with the corpus): ``ok``, ``error`` (counts), ``pixels`` ``(K,) int64`` (pixels per class),
    ``images_with`` ``(K,) int64`` (images holding each class) and ``confidence`` ``(N_ok,) float64``
    (per-image mean confidence)."""
    import pyarrow.compute as pc

    k = num_classes
    out = {"ok": 0, "error": 0, "pixels": np.zeros(k, np.int64), "images_with": np.zeros(k, np.int64)}
    conf = []
    for f in files:
        t = read_shard(fs, f, STAT_COLUMNS)
        ok = t.filter(pc.equal(t.column("status"), OK))
        out["ok"] += ok.num_rows
        out["error"] += t.num_rows - ok.num_rows
        cp = ok.column("class_pixels")
        lengths = pc.list_value_length(cp).to_numpy(zero_copy_only=False)
        if ok.num_rows and (lengths != k).any():
            raise ValueError(f"class_pixels has {int(lengths[lengths != k][0])} entries, vocabulary has {k}")
        counts = pc.list_flatten(cp).to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, k)
        out["pixels"] += counts.sum(axis=0)
        out["images_with"] += (counts > 0).sum(axis=0)
        c = ok.column("mean_confidence").to_numpy(zero_copy_only=False).astype(np.float64)
        conf.append(c[~np.isnan(c)])
    out["confidence"] = np.concatenate(conf) if conf else np.zeros(0)
    return out


def _sample_rows(fs, files: Sequence[str], n: int) -> list[dict]:
    """The first ``n`` ok rows (by file, then row order) with their mask_png."""
    rows: list[dict] = []
    for f in files:
        t = read_shard(fs, f, ["image_uri", "image_id", "status", "mask_png"])
        for r in t.to_pylist():
            if r["status"] == OK:
                rows.append(r)
                if len(rows) == n:
                    return rows
    return rows


def _read_image(uri: str, so: dict) -> np.ndarray:
    """An image the job segmented. No pixel limit here: the job already held it to its own ``max_pixels``,
    which a run may raise above the default."""
    from rfclip.decode import decode_image  # the job's decoder: same modes / EXIF handling
    data = read_uris([uri], so)[0]         # as the job read it: no "::" URL chaining, retried
    if isinstance(data, BaseException):
        raise data
    return decode_image(data, max_pixels=sys.maxsize)


# ----------------------------------------------------------------------------- figures

def iou_bar_chart(result: dict) -> bytes:
    """Horizontal bars of per-class IoU (%), sorted, classes with null IoU left out."""
    cls = sorted((c for c in result["classes"] if c["iou"] is not None), key=lambda c: c["iou"])
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.2 * len(cls) + 1)))
    ax.barh([c["name"] for c in cls], [c["iou"] for c in cls], color="#4477aa")
    if result["mIoU"] is not None:          # null when no pixel was scored (every label pixel ignored)
        ax.axvline(result["mIoU"], color="#cc3311", ls="--", label=f"mIoU {result['mIoU']:.1f}")
    ax.set_xlabel("IoU (%)")
    ax.set_xlim(0, 100)
    ax.tick_params(axis="y", labelsize=7 if len(cls) > 40 else 9)
    if result["mIoU"] is not None:
        ax.legend(loc="lower right")
    ax.set_title(f"Per-class IoU ({result['images']} images)")
    return _fig_bytes(fig)


def confusion_heatmap(cm: np.ndarray, class_names: Sequence[str]) -> bytes:
    """``(K, K)`` counts as a heatmap, each ground-truth row divided by its total (empty rows blank)."""
    k = cm.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = cm / cm.sum(axis=1, keepdims=True)
    size = min(20, max(5, 0.25 * k + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    step = 1 if k <= 60 else 10
    ticks = np.arange(0, k, step)
    labels = [class_names[i] if step == 1 else str(i) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    ax.set_title("Confusion matrix, normalised per ground-truth class")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _fig_bytes(fig)


def sample_grid(samples: list[tuple[str, np.ndarray, np.ndarray, Optional[np.ndarray]]],
                class_names: Sequence[str], ignore_index: Optional[int] = None,
                overlay: bool = False) -> bytes:
    """Rows of (title, image ``(H,W,3) uint8``, prediction ``(H,W)``, ground truth ``(H,W)`` or None).

    With ground truth: image | prediction | ground truth. Without and ``overlay``: image | overlay.
    One legend for every class shown, and for ignored pixels.
    """
    pal = class_palette(class_names)
    ncol = 3 if samples and samples[0][3] is not None else 2
    shown: set[int] = set()
    fig, axes = plt.subplots(len(samples), ncol, figsize=(3.2 * ncol, 2.6 * len(samples)), squeeze=False)
    for row, (title, img, pred, gt) in zip(axes, samples):
        shown.update(np.unique(pred).tolist())
        pred_rgb = colorize(pred, pal)
        panels = [(img, title), ]
        if gt is not None:
            shown.update(np.unique(gt[gt != ignore_index]).tolist())
            panels += [(pred_rgb, "prediction"), (colorize(gt, pal, ignore_index), "ground truth")]
        else:
            blend = (0.5 * img + 0.5 * pred_rgb).astype(np.uint8) if overlay else pred_rgb
            panels += [(blend, "prediction overlay" if overlay else "prediction")]
        for ax, (arr, name) in zip(row, panels):
            ax.imshow(arr, interpolation="nearest")
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    handles = [Patch(color=pal[c] / 255.0, label=class_names[c]) for c in sorted(shown)
               if 0 <= c < len(class_names)]
    if ignore_index is not None and any(s[3] is not None for s in samples):
        handles.append(Patch(color=np.array(IGNORE_RGB) / 255.0, label="ignored"))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, max(1, len(handles))), fontsize=7,
               bbox_to_anchor=(0.5, -0.02 - 0.012 * (len(handles) // 6)))
    fig.tight_layout()
    return _fig_bytes(fig)


def class_distribution_chart(pixels: np.ndarray, class_names: Sequence[str], images: int) -> bytes:
    """Bars of each class's share (%) of all predicted pixels, sorted, zero classes left out."""
    share = pixels / max(1, pixels.sum()) * 100
    order = [i for i in np.argsort(share) if pixels[i] > 0]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.2 * len(order) + 1)))
    ax.barh([class_names[i] for i in order], share[order], color="#228833")
    ax.set_xlabel("share of predicted pixels (%)")
    ax.set_title(f"Class distribution over {images} images")
    return _fig_bytes(fig)


def confidence_histogram(conf: np.ndarray) -> bytes:
    """Histogram of per-image mean confidence (max class probability), 20 bins on [0, 1]."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(conf, bins=20, range=(0, 1), color="#aa3377")
    ax.set_xlabel("mean confidence per image")
    ax.set_ylabel("images")
    ax.set_title(f"Confidence ({len(conf)} images, median {np.median(conf):.2f})" if len(conf) else "Confidence")
    return _fig_bytes(fig)


# ----------------------------------------------------------------------------- the report

def worst_classes(result: dict, cm: np.ndarray, n: int = 10) -> list[dict]:
    """The ``n`` lowest-IoU classes present in the ground truth, with their most frequent confusion."""
    names = [c["name"] for c in result["classes"]]
    present = [(i, c) for i, c in enumerate(result["classes"]) if c["acc"] is not None]
    out = []
    for i, c in sorted(present, key=lambda t: t[1]["iou"])[:n]:
        row = cm[i].astype(np.float64).copy()
        row[i] = -1
        j = int(np.argmax(row))
        share = row[j] / cm[i].sum() * 100 if row[j] > 0 else 0.0
        out.append({"name": c["name"], "iou": c["iou"], "acc": c["acc"],
                    "confused_with": names[j] if row[j] > 0 else None, "confused_share": share})
    return out


def write_report(output_uri: str, class_names: Sequence[str], source=None,
                 storage_options: Optional[dict] = None, num_samples: int = 6,
                 title: Optional[str] = None) -> str:
    """Write ``{output}/report.md`` and ``{output}/figures/*.png``; return the report's URI.

    Class names are drawn as typed: matplotlib would read ``$...$`` in one as a formula (and fail on a bad one).
    """
    with plt.rc_context({"text.parse_math": False}):
        return _write_report(output_uri, class_names, source, storage_options, num_samples, title)


def _write_report(output_uri: str, class_names: Sequence[str], source, storage_options: Optional[dict],
                  num_samples: int, title: Optional[str]) -> str:
    so = dict(storage_options or {})
    files, fs = committed_shard_files(output_uri, so)
    stats = corpus_stats(fs, files, len(class_names))
    root = get_fs(output_uri, so)[1].rstrip("/")

    def put(name: str, data: bytes) -> str:
        atomic_write_bytes(fs, posixpath.join(root, "figures", name), data)
        return f"figures/{name}"

    samples = _load_samples(_sample_rows(fs, files, num_samples), source, so)
    md = [f"# {title or ('Evaluation report' if source is not None else 'Pseudo-labelling report')}", "",
          f"{stats['ok']} images segmented, {stats['error']} failed (see `status`/`error` in predictions/*.parquet).",
          ""]
    if source is not None:
        md += _evaluation_sections(fs, root, class_names, source, samples, put)
    else:
        md += _pseudo_label_sections(stats, class_names, samples, put)
    atomic_write_bytes(fs, posixpath.join(root, "report.md"), "\n".join(md).encode())
    return posixpath.join(output_uri.rstrip("/"), "report.md")


def _load_samples(rows: list[dict], source, so: dict) -> list[tuple]:
    """``(image_id, rgb, prediction, label or None)`` of the sample ``rows`` that can be shown. One that can't
    (its file gone or changed since the run) is left out, with a warning: the predictions and metrics stand
    without it."""
    gt_of = dict(source.pairs) if source is not None else {}
    samples = []
    for r in rows:
        try:
            img = _read_image(r["image_uri"], so)
            pred = decode_label_png(r["mask_png"])
            gt = None
            if source is not None:
                if r["image_uri"] not in gt_of:
                    raise KeyError("no label for it in the labelled source")
                gt = source.read_label(gt_of[r["image_uri"]])
                if gt.shape != pred.shape:
                    raise ValueError(f"prediction {pred.shape} vs label {gt.shape}")
            if img.shape[:2] != pred.shape:
                raise ValueError(f"image {img.shape[:2]} vs prediction {pred.shape}")
        except Exception as exc:  # noqa: BLE001 - any reason; it is named in the warning
            log.warning("report: sample %s left out: %s: %s", r["image_id"], type(exc).__name__, scrub(str(exc)))
            continue
        samples.append((str(r["image_id"]), img, pred, gt))
    return samples


def _evaluation_sections(fs, root: str, class_names: Sequence[str], source, samples: list, put) -> list[str]:
    """The report's lines for a labelled run: scores, per-class IoU, worst classes, confusion, samples."""
    with fs.open(posixpath.join(root, "metrics.json"), "rb") as f:
        result = json.load(f)
    with fs.open(posixpath.join(root, "metrics", "confusion.npy"), "rb") as f:
        cm = np.load(io.BytesIO(f.read()))
    md = [f"Evaluated on {result['images']} images, {result['num_classes']} classes "
          f"(full table: [metrics.md](metrics.md)).", "",
          "| aAcc | mIoU | mAcc |", "|---|---|---|",
          f"| {_fmt(result['aAcc'])} | {_fmt(result['mIoU'])} | {_fmt(result['mAcc'])} |", "",
          "## Per-class IoU", "", f"![per-class IoU]({put('iou.png', iou_bar_chart(result))})", "",
          "## Worst classes", "", "| class | IoU | Acc | most often predicted as |", "|---|---|---|---|"]
    for w in worst_classes(result, cm):
        conf = (f"{md_cell(w['confused_with'])} ({w['confused_share']:.0f}% of its pixels)"
                if w["confused_with"] else "–")
        md.append(f"| {md_cell(w['name'])} | {w['iou']:.2f} | {w['acc']:.2f} | {conf} |")
    md += ["", "## Confusion matrix", "",
           f"![confusion matrix]({put('confusion.png', confusion_heatmap(cm, list(class_names)))})", ""]
    if samples:
        md += ["## Samples", "", "Image, prediction, ground truth (cream: ignored pixels; the legend names the "
               "colours).", "",
               f"![samples]({put('samples.png', sample_grid(samples, class_names, source.ignore_index))})", ""]
    return md


def _pseudo_label_sections(stats: dict, class_names: Sequence[str], samples: list, put) -> list[str]:
    """The report's lines for an unlabelled run: class distribution, confidence, samples."""
    pixels, images_with, conf = stats["pixels"], stats["images_with"], stats["confidence"]
    chart = put("class_distribution.png", class_distribution_chart(pixels, class_names, stats["ok"]))
    md = ["## Class distribution", "", f"![class distribution]({chart})", "",
          "| class | share of pixels (%) | images |", "|---|---|---|"]
    for i in np.argsort(-pixels):
        if pixels[i] > 0:
            md.append(f"| {md_cell(class_names[i])} | {pixels[i] / pixels.sum() * 100:.2f} | {images_with[i]} |")
    md += ["", "## Confidence", "", f"![confidence]({put('confidence.png', confidence_histogram(conf))})", ""]
    if samples:
        md += ["## Samples", "", "Image and prediction overlaid (50%).", "",
               f"![samples]({put('samples.png', sample_grid(samples, class_names, overlay=True))})", ""]
    return md
