"""report.md + PNG figures for an evaluation and for a pseudo-labelling run, on real VOC files."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import open_labelled_source
from pipeline.metrics import confusion_matrix, reduce_confusion
from pipeline.sinks import commit_shard
from pipeline.report import IGNORE_RGB, colorize, write_report
from rfclip.visualize import label_png, palette
from shared_data import shared_data_dir


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _fake_run(out, src, n, rng):
    """predictions/shard-00000.parquet + its confusion: the label with 20% of pixels changed."""
    rows, cm = [], np.zeros((src.num_classes,) * 2, dtype=np.int64)
    for img, lab in src.pairs[:n]:
        gt = src.read_label(lab)
        pred = np.where(gt == src.ignore_index, 0, gt)
        noise = rng.random(gt.shape) < 0.2
        pred[noise] = rng.integers(0, src.num_classes, size=int(noise.sum()))
        cm += confusion_matrix(pred, gt, src.num_classes, src.ignore_index)
        counts = np.bincount(pred.ravel(), minlength=src.num_classes)
        rows.append(dict(image_uri=img, image_id=img.rsplit("/", 1)[-1][:-4], width=gt.shape[1],
                         height=gt.shape[0], status="ok", error=None, mask_png=_png(pred),
                         class_pixels=counts.tolist(), mean_confidence=float(rng.random()),
                         elapsed_ms=1.0))
    rows.append(dict(image_uri="/nope.jpg", image_id="nope", width=None, height=None, status="error",
                     error="not an image", mask_png=None, class_pixels=None, mean_confidence=None,
                     elapsed_ms=0.1))
    commit_shard(str(out), None, "shard-00000", rows, {"name": "shard-00000"},
                 {"num_classes": src.num_classes, "ignore_index": src.ignore_index, "images": n,
                  "matrix": cm.tolist()})


def _figures(report_text, out):
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_text)
    for link in links:
        with Image.open(out / link) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
    return links


def test_evaluation_report(tmp_path):
    data = shared_data_dir()
    src = open_labelled_source("voc21", data_root=str(data / "voc2012-mini"))
    out = tmp_path / "run"
    _fake_run(out, src, 4, np.random.default_rng(0))
    result = reduce_confusion(str(out), class_names=src.class_names, extra={"benchmark": "voc21", "method": "fake"})
    uri = write_report(str(out), src.class_names, source=src, num_samples=3)
    text = (out / "report.md").read_text()
    assert uri.endswith("report.md")
    assert f"| {result['mIoU']:.2f} |" in text
    assert "4 images segmented, 1 failed" in text
    assert _figures(text, out) == ["figures/iou.png", "figures/confusion.png", "figures/samples.png"]
    # worst-classes table: rows sorted by IoU, only classes present in the ground truth
    table = text.split("## Worst classes")[1].split("## Confusion")[0]
    ious = [float(m) for m in re.findall(r"^\| [^|]+ \| ([0-9.]+) \|", table, flags=re.M)]
    present = sorted(c["iou"] for c in result["classes"] if c["acc"] is not None)
    assert ious == pytest.approx([round(v, 2) for v in present[:10]], abs=0.006)


def test_pseudo_label_report(tmp_path):
    data = shared_data_dir()
    src = open_labelled_source("voc21", data_root=str(data / "voc2012-mini"))
    out = tmp_path / "run"
    _fake_run(out, src, 3, np.random.default_rng(1))
    # what a commit killed between its write and its rename leaves behind: not a committed shard
    shard = out / "predictions" / "shard-00000.parquet"
    (shard.parent / ".tmp-0123456789ab-shard-00001.parquet").write_bytes(shard.read_bytes())
    write_report(str(out), src.class_names, num_samples=2)
    text = (out / "report.md").read_text()
    assert _figures(text, out) == ["figures/class_distribution.png", "figures/confidence.png",
                                   "figures/samples.png"]
    assert "3 images segmented, 1 failed" in text
    # background gets ~80% of each image plus noise: the top row of the distribution table
    first = text.split("| class | share of pixels (%) | images |")[1].splitlines()[2]
    assert first.startswith("| background |") and first.endswith("| 3 |")
    # names drawn and tabled as typed: "$\foo$" is no formula to matplotlib, "|" no column to Markdown
    odd = [r"price $\foo$", "sky|blue"] + list(src.class_names[2:])
    write_report(str(out), odd, num_samples=2)
    text = (out / "report.md").read_text()
    assert "| sky\\|blue |" in text and all(line.count(" | ") == 2 for line in text.splitlines()
                                             if line.startswith("| price") or line.startswith("| sky"))


def test_palette_and_colorize():
    pal = palette(171)
    assert pal.shape == (171, 3) and pal.dtype == np.uint8
    assert len({tuple(c) for c in pal}) == 171
    rgb = colorize(np.array([[0, 1], [255, 2]]), pal, ignore_index=255)
    assert (rgb[1, 0] == IGNORE_RGB).all() and (rgb[0, 1] == pal[1]).all() and (rgb[0, 0] == pal[0]).all()
    assert IGNORE_RGB not in {tuple(int(v) for v in c) for c in pal}
    # the colours of the job's masks/*.png, as an image viewer shows them
    with Image.open(io.BytesIO(label_png(np.array([[0, 1], [7, 2]]), 171))) as im:
        assert (np.asarray(im.convert("RGB")) == colorize(np.array([[0, 1], [7, 2]]), pal)).all()


def test_class_zero_is_black_only_when_it_is_a_background_class():
    """VOC and PASCAL Context draw class 0, background, black; a user's "sky; road; car" gets VOC's colours
    from index 1, so sky is not drawn as if unlabelled. Masks, overlays and figures agree."""
    from rfclip.visualize import class_palette, first_is_background, overlay

    assert first_is_background(["background", "aeroplane"]) and first_is_background(["Background, bg"])
    assert not first_is_background(["sky", "road"]) and not first_is_background([])
    voc = palette(4)
    np.testing.assert_array_equal(class_palette(["background", "a", "b"]), voc[:3])
    mine = class_palette(["sky", "road", "car"])
    np.testing.assert_array_equal(mine, voc[1:])
    assert (mine != 0).any(axis=1).all()                       # no class black
    lab = np.array([[0, 1], [2, 0]])
    with Image.open(io.BytesIO(label_png(lab, 3, background=False))) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), mine[lab])
    rgb = np.zeros((2, 2, 3), np.uint8)
    drawn = np.asarray(overlay(rgb, lab, ["sky", "road", "car"], alpha=1.0))[:2, :2]
    np.testing.assert_array_equal(drawn, mine[lab])


def test_report_needs_predictions(tmp_path):
    with pytest.raises(FileNotFoundError, match="predictions"):
        write_report(str(tmp_path), ["a", "b"])


def test_iou_chart_and_metrics_md_when_no_pixel_was_scored():
    """Every label pixel ignored: mIoU is null, and the report still draws (no format of None)."""
    from pipeline.metrics import metrics_markdown, summarize
    from pipeline.report import iou_bar_chart

    result = summarize(np.zeros((3, 3), np.int64), ["a", "b", "c"], images=2)
    assert result["mIoU"] is None and result["aAcc"] is None
    with Image.open(io.BytesIO(iou_bar_chart(result))) as im:
        assert im.size[0] > 0
    assert "| – | – | – |" in metrics_markdown(result)


def test_report_reads_images_above_the_default_pixel_limit(tmp_path):
    """A run may raise --max-pixels; the report re-reads its segmented images without the default limit."""
    from PIL import Image

    from rfclip.decode import DEFAULT_MAX_PIXELS
    from pipeline.report import _read_image

    big = tmp_path / "big.png"
    Image.new("L", (8000, 7000)).save(big)
    assert 8000 * 7000 > DEFAULT_MAX_PIXELS
    assert _read_image(str(big), {}).shape == (7000, 8000, 3)


def test_corpus_stats_sum_each_shard_as_a_loop_over_the_rows_does(tmp_path):
    """Per-shard pyarrow sums (no Python lists of the whole corpus) against a plain loop over every row,
    across shards with error rows and a null confidence; a class_pixels of the wrong length is refused."""
    from pipeline.report import corpus_stats
    from pipeline.sinks import committed_shard_files

    rng = np.random.default_rng(3)
    k, rows_all = 5, []
    for s in range(3):
        rows = []
        for i in range(4 + s):
            ok = (i + s) % 3 != 0
            counts = rng.integers(0, 3, k) * rng.integers(0, 1000, k) if ok else None
            rows.append(dict(image_uri=f"/x/{s}-{i}.jpg", image_id=f"{s}-{i}", width=4, height=4,
                             status="ok" if ok else "error", error=None if ok else "bad", mask_png=b"" if ok else None,
                             class_pixels=counts.tolist() if ok else None,
                             mean_confidence=(None if i == 1 else float(rng.random())) if ok else None, elapsed_ms=1.0))
        commit_shard(str(tmp_path), None, f"shard-{s:05d}", rows, {"name": f"shard-{s:05d}"})
        rows_all += rows
    files, fs = committed_shard_files(str(tmp_path), None)
    got = corpus_stats(fs, files, k)
    ok_rows = [r for r in rows_all if r["status"] == "ok"]
    assert (got["ok"], got["error"]) == (len(ok_rows), len(rows_all) - len(ok_rows))
    np.testing.assert_array_equal(got["pixels"], np.sum([r["class_pixels"] for r in ok_rows], axis=0))
    np.testing.assert_array_equal(got["images_with"], np.sum([np.array(r["class_pixels"]) > 0 for r in ok_rows], axis=0))
    np.testing.assert_allclose(sorted(got["confidence"]),
                               sorted(r["mean_confidence"] for r in ok_rows if r["mean_confidence"] is not None))
    with pytest.raises(ValueError, match="class_pixels has 5 entries, vocabulary has 6"):
        corpus_stats(fs, files, 6)
