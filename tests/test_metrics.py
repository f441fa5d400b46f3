"""Confusion matrices and the reducer (over shards committed by pipeline.sinks) against a direct
per-class NumPy computation, shard reordering and resumed runs."""
from __future__ import annotations

import json
import math

import fsspec
import numpy as np
import pytest

from _direct_metrics import direct_scores
from pipeline.metrics import confusion_matrix, reduce_confusion, summarize
from pipeline.sinks import commit_shard

K = 6
IGN = 255
NAMES = [f"c{i}" for i in range(K)]


def _random_maps(rng, n):
    """n (pred, gt) pairs of varied sizes; class 5 never occurs, class 4 only in predictions."""
    out = []
    for _ in range(n):
        h, w = rng.integers(5, 40, size=2)
        gt = rng.integers(0, 4, size=(h, w))
        gt[rng.random((h, w)) < 0.15] = IGN
        pred = rng.integers(0, 5, size=(h, w))
        out.append((pred, gt))
    return out


def _write_shards(output, maps, shard_size, order=None, names=None):
    """Commit shards of ``maps`` like the job does: rows + the shard's summed matrix in the footer."""
    idx = list(range(0, len(maps), shard_size))
    for s in (order or range(len(idx))):
        start = idx[s]
        part = maps[start:start + shard_size]
        cm = sum(confusion_matrix(p, g, K, IGN) for p, g in part)
        rows = [dict(image_uri=f"/img/{i}.jpg", image_id=f"img{i}", width=g.shape[1], height=g.shape[0],
                     status="ok", error=None, mask_png=b"", class_pixels=[0] * K, mean_confidence=0.5,
                     elapsed_ms=1.0) for i, (_, g) in enumerate(part, start)]
        name = (names or "shard-{:05d}").format(s)
        commit_shard(output, None, name, rows, {"name": name},
                     {"num_classes": K, "ignore_index": IGN, "images": len(part), "matrix": cm.tolist()})


def test_confusion_matrix_basic():
    gt = np.array([[0, 1, IGN], [2, 2, 1]])
    pred = np.array([[0, 2, 1], [2, 0, 1]])
    cm = confusion_matrix(pred, gt, 3, IGN)
    assert cm.dtype == np.int64 and cm.shape == (3, 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [1, 0, 1]])
    with pytest.raises(ValueError, match="ground-truth values"):
        confusion_matrix(pred, np.array([[0, 1, 7], [2, 2, 1]]), 3, IGN)
    with pytest.raises(ValueError, match="prediction values"):
        confusion_matrix(np.full((2, 3), 3), gt, 3, IGN)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(pred[:, :2], gt, 3, IGN)


def test_reducer_equals_direct_numpy(tmp_path):
    maps = _random_maps(np.random.default_rng(0), 23)
    out = str(tmp_path / "run")
    _write_shards(out, maps, shard_size=5)
    res = reduce_confusion(out, class_names=NAMES, extra={"benchmark": "synthetic", "method": "random"})
    iou, acc, miou, macc, aacc = direct_scores(maps, K, IGN)
    assert res["images"] == 23 and res["benchmark"] == "synthetic"
    assert math.isclose(res["mIoU"], miou, rel_tol=1e-12)
    assert math.isclose(res["mAcc"], macc, rel_tol=1e-12)
    assert math.isclose(res["aAcc"], aacc, rel_tol=1e-12)
    for c, (i, a) in enumerate(zip(iou, acc)):
        got = res["classes"][c]
        assert got["name"] == NAMES[c]
        assert (got["iou"] is None) == np.isnan(i) and (got["acc"] is None) == np.isnan(a)
        if got["iou"] is not None:
            assert math.isclose(got["iou"], i, rel_tol=1e-12)
    # class 5: absent everywhere -> null; class 4: predicted only -> IoU 0, Acc null
    assert res["classes"][5] == {"name": "c5", "iou": None, "acc": None}
    assert res["classes"][4]["iou"] == 0.0 and res["classes"][4]["acc"] is None
    on_disk = json.loads((tmp_path / "run/metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    md = (tmp_path / "run/metrics.md").read_text()
    assert f"| {miou:.2f} |" in md and "| c5 | – | – |" in md
    cm = np.load(tmp_path / "run/metrics/confusion.npy")
    assert cm.dtype == np.int64 and cm.sum() == res["pixels"]


def test_reducer_order_and_resume_invariant(tmp_path):
    maps = _random_maps(np.random.default_rng(1), 20)
    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    _write_shards(a, maps, 4)
    # written in another order and under names that sort differently
    _write_shards(b, maps, 4, order=[3, 0, 4, 2, 1], names="shard-{}x")
    # a "resumed" run: shards 0-2 done first, then the run dies, restarts, redoes shard 2 and
    # finishes 3-4 (shard 2 is overwritten, not added twice)
    _write_shards(c, maps[:12], 4)
    _write_shards(c, maps, 4, order=[2, 3, 4])
    ra, rb, rc = (reduce_confusion(x, class_names=NAMES) for x in (a, b, c))
    assert ra == rb == rc and ra["images"] == 20
    assert math.isclose(ra["mIoU"], direct_scores(maps, K, IGN)[2], rel_tol=1e-12)


def test_a_shard_damaged_after_its_commit_says_how_to_redo_it(tmp_path):
    maps = _random_maps(np.random.default_rng(3), 4)
    out = str(tmp_path / "run")
    _write_shards(out, maps, 2)
    damaged = sorted((tmp_path / "run" / "predictions").glob("shard-*.parquet"))[1]
    damaged.write_bytes(b"PA")
    with pytest.raises(ValueError, match=f"committed shard .*{damaged.name} can't be read .*delete it and run the "
                                         f"same command again"):
        reduce_confusion(out, class_names=NAMES)


def test_reducer_refuses_double_counting_and_empty(tmp_path):
    maps = _random_maps(np.random.default_rng(2), 8)
    out = str(tmp_path / "run")
    _write_shards(out, maps, 4)
    _write_shards(out, maps[:4], 4, names="shard-extra-{}")  # same images under another shard name
    with pytest.raises(ValueError, match="counted in two shards"):
        reduce_confusion(out, class_names=NAMES)
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        reduce_confusion(str(tmp_path / "empty"), class_names=NAMES)
    good = str(tmp_path / "good")
    _write_shards(good, maps, 4)
    with pytest.raises(ValueError, match="class names"):
        reduce_confusion(good, class_names=NAMES[:3])


def test_reducer_on_object_storage():
    maps = _random_maps(np.random.default_rng(3), 6)
    out = "memory://metrics-test/run"
    try:
        _write_shards(out, maps, 2)
        res = reduce_confusion(out, class_names=NAMES)
        assert res["images"] == 6
        with fsspec.open(out + "/metrics.json") as f:
            assert json.load(f)["mIoU"] == res["mIoU"]
    finally:
        fsspec.filesystem("memory").rm("/metrics-test", recursive=True)


def test_summarize_matches_mmseg_formula_on_small_case():
    # gt row / pred col. class0: TP 3 FP 1 FN 1 -> IoU 3/5; class1: TP 2 FP 1 FN 1 -> 2/4; class2 empty
    cm = np.array([[3, 1, 0], [1, 2, 0], [0, 0, 0]], dtype=np.int64)
    r = summarize(cm, ["a", "b", "c"], images=1)
    assert math.isclose(r["classes"][0]["iou"], 60.0) and math.isclose(r["classes"][1]["iou"], 50.0)
    assert math.isclose(r["mIoU"], 55.0) and math.isclose(r["aAcc"], 5 / 7 * 100)
    assert math.isclose(r["mAcc"], (3 / 4 + 2 / 3) / 2 * 100)


def test_encode_stage_scores_each_row_and_turns_bad_labels_into_error_rows(tmp_path):
    """The workers' CPU stage: a row whose label reads and fits gets its confusion matrix; a label of
    another size, a missing label file and an undecodable one each make that row an error row with the
    reason, and the other rows are scored."""
    from pipeline.workers import encode_stage

    rng = np.random.default_rng(0)
    preds = [rng.integers(0, K, size=(4, 5)).astype(np.uint8) for _ in range(4)]
    gt = rng.integers(0, K, size=(4, 5))
    (tmp_path / "good.npy").write_bytes(gt.astype(np.int64).tobytes())
    (tmp_path / "small.npy").write_bytes(gt[:3].astype(np.int64).tobytes())
    (tmp_path / "odd.npy").write_bytes(b"\x00" * 7)
    decode = lambda data: np.frombuffer(data, np.int64).reshape(-1, 5)  # noqa: E731
    uris = [str(tmp_path / n) for n in ("good.npy", "small.npy", "missing.npy", "odd.npy")]
    batch = {"image_uri": np.array([f"i{j}" for j in range(4)], dtype=object),
             "label_uri": np.array(uris, dtype=object), "status": np.array(["ok"] * 4, dtype=object),
             "error": np.array([""] * 4, dtype=object), "height": np.full(4, 4), "width": np.full(4, 5),
             "labels": np.array([p.tobytes() for p in preds], dtype=object),
             "decode_ms": np.zeros(4), "segment_ms": np.zeros(4)}
    out = encode_stage(batch, num_classes=K, output_uri=str(tmp_path / "out"), storage_options=None,
                       save_masks=False, decode_label=decode, ignore_index=IGN)
    assert list(out["status"]) == ["ok", "error", "error", "error"]
    got = np.frombuffer(out["confusion"][0], np.int64).reshape(K, K)
    assert np.array_equal(got, confusion_matrix(preds[0].astype(np.int64), gt, K, IGN)) and got.sum() == 20
    assert "label failed: ValueError: label size (5, 3) != image size (5, 4)" in out["error"][1]
    assert out["error"][2].startswith("label failed: FileNotFoundError") and "label failed: " in out["error"][3]
    assert all(out["confusion"][j] == b"" and out["mask_png"][j] == b"" for j in (1, 2, 3))
    assert np.frombuffer(out["class_pixels"][0], np.int64).sum() == 20


def test_encode_stage_stops_on_storage_that_cant_be_read_instead_of_an_error_row(tmp_path, monkeypatch):
    """A label the storage can't deliver (retries spent) is not a bad label: the batch fails, and a re-run
    scores the image, instead of leaving it out of the mIoU for good."""
    import pytest

    from pipeline import storage, workers

    batch = {"image_uri": np.array(["i0"], dtype=object), "label_uri": np.array(["s3://b/l.png"], dtype=object),
             "status": np.array(["ok"], dtype=object), "error": np.array([""], dtype=object),
             "height": np.full(1, 4), "width": np.full(1, 5), "labels": np.array([bytes(20)], dtype=object),
             "decode_ms": np.zeros(1), "segment_ms": np.zeros(1)}
    monkeypatch.setattr(workers, "read_uris", lambda uris, *a, **k: [ConnectionError("Connection reset by peer")])
    with pytest.raises(storage.StorageError, match="can't read s3://b/l.png, retries spent: ConnectionError"):
        workers.encode_stage(batch, num_classes=K, output_uri=str(tmp_path / "out"), storage_options=None,
                             save_masks=False, decode_label=lambda data: np.zeros((4, 5), np.int64),
                             ignore_index=IGN)


def test_the_model_stage_makes_error_rows_of_failed_images_but_stops_on_a_failed_device():
    """An image the model fails on is an error row, its batch-mates segmented; a CUDA error is the device's:
    every later call in that process fails too, so the batch fails (the job stops, a re-run redoes it)
    instead of the rest of the corpus becoming error rows."""
    import types

    import pytest

    from pipeline.workers import SegmentWorker

    worker = object.__new__(SegmentWorker)                  # no model: _segment is replaced below
    worker.seg = types.SimpleNamespace(execution=lambda: {"device": "cpu"})
    worker.dtype, worker.delay_s = np.dtype(np.uint8), 0.0
    n = 3
    batch = {"image_uri": np.array([f"i{j}" for j in range(n)], dtype=object),
             "image_id": np.array([f"i{j}" for j in range(n)], dtype=object),
             "status": np.array(["ok"] * n, dtype=object), "error": np.array([None] * n, dtype=object),
             "pixels": np.array([bytes(2 * 2 * 3)] * n, dtype=object), "rh": np.full(n, 2), "rw": np.full(n, 2),
             "height": np.full(n, 2), "width": np.full(n, 2)}
    seen = []

    def segment(images, sizes):
        seen.append(len(images))
        if len(images) > 1 or len(seen) == 3:             # the batch, then the second image alone
            raise RuntimeError("cannot reshape this image")
        return [types.SimpleNamespace(labels=np.zeros(sizes[0], np.int32), confidence=np.ones(sizes[0]))]

    worker._segment = segment
    out = worker(batch)
    assert list(out["status"]) == ["ok", "error", "ok"] and "cannot reshape this image" in out["error"][1]

    def device_fails(images, sizes):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    worker._segment = device_fails
    with pytest.raises(RuntimeError, match="CUDA error"):
        worker(batch)
    from pipeline.workers import device_fault
    assert not device_fault(RuntimeError("CUDA error: out of memory")) and not device_fault(ValueError("shape"))
