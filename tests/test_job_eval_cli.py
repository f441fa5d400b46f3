"""The job's command line as a user runs it for evaluation: --benchmark/--data-root, --labels, --limit."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import pipeline_cli_args, read_predictions
from pipeline.sinks import clear_outputs
from pipeline.sources import image_id, resolve_inputs
from shared_data import shared_data_dir

pytestmark = pytest.mark.slow

CAMVID = "sky; building; pole; road; pavement; tree; sign symbol; fence; car; pedestrian; bicyclist"


def model_flags(tiny_model):
    flags = pipeline_cli_args(tiny_model)
    i = flags.index("--vocabulary")
    return flags[:i] + flags[i + 2:]                      # each test gives its own vocabulary


def test_benchmark_from_data_root_writes_metrics_and_report(ray_local, tiny_model, tmp_path, capsys):
    from jobs.segment_dataset import main

    data = shared_data_dir()
    out = tmp_path / "voc"
    rc = main(["--benchmark", "voc21", "--data-root", str(data / "voc2012-mini"), "--limit", "3",
               "--output", str(out)] + model_flags(tiny_model))
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and len(metrics["classes"]) == 21
    assert metrics["classes"][0]["name"] == "background"
    assert json.loads((out / "run.json").read_text())["runtime"]["class_names"][:2] == ["background", "aeroplane"]
    assert 0.0 <= metrics["mIoU"] <= 100.0
    assert (out / "metrics.md").is_file() and (out / "report.md").is_file()
    assert "mIoU" in capsys.readouterr().out
    rows = read_predictions(str(out)).to_pylist()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    # image ids are relative to the data root, so they survive a move of the corpus and --limit
    assert [r["image_id"] for r in rows] == [image_id(r["image_uri"], str(data / "voc2012-mini")) for r in rows]
    clear_outputs(str(out), None)                         # --overwrite removes all an evaluation wrote
    assert not list(out.iterdir())


def test_custom_labels_camvid_with_ignore_index(ray_local, tiny_model, tmp_path):
    from jobs.segment_dataset import main

    data = shared_data_dir() / "camvid-val"
    images, labels = tmp_path / "val", tmp_path / "valannot"
    images.mkdir()
    labels.mkdir()
    for p in sorted((data / "val").iterdir())[:3]:
        shutil.copy(p, images / p.name)
        shutil.copy(data / "valannot" / p.name, labels / p.name)
    out = tmp_path / "camvid"
    rc = main(["--input", str(images), "--labels", str(labels), "--ignore-index", "11", "--vocabulary", CAMVID,
               "--output", str(out)] + model_flags(tiny_model))
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and [c["name"] for c in metrics["classes"]][:2] == ["sky", "building"]
    # aAcc recomputed from the stored masks and the label files, ignoring value 11
    correct = total = 0
    for row in read_predictions(str(out)).to_pylist():
        with Image.open(__import__("io").BytesIO(row["mask_png"])) as m:
            pred = np.asarray(m).astype(np.int64)
        gt = np.asarray(Image.open(labels / (row["image_uri"].rsplit("/", 1)[-1]))).astype(np.int64)
        keep = gt != 11
        correct += int((pred[keep] == gt[keep]).sum())
        total += int(keep.sum())
    assert metrics["aAcc"] == pytest.approx(100.0 * correct / total, abs=1e-6)
    plain = resolve_inputs(str(images))                   # the ids a plain --input run over the folder gives
    want = {it["image_uri"]: image_id(it["image_uri"], plain.root) for it in plain.items}
    assert {r["image_uri"]: r["image_id"] for r in read_predictions(str(out)).to_pylist()} == want


def test_labels_inside_the_input_folder_and_an_unreadable_name(ray_local, tiny_model, tmp_path):
    """--labels inside --input: its PNGs are labels, not images. An image whose name is not UTF-8 needs
    no label: it is an error row, counted as failed, and the others are scored."""
    import os

    from jobs.segment_dataset import main

    data = shared_data_dir() / "camvid-val"
    root = tmp_path / "corpus"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for p in sorted((data / "val").iterdir())[:2]:
        shutil.copy(p, root / "images" / p.name)
        shutil.copy(data / "valannot" / p.name, root / "labels" / p.name)
    shutil.copy(p, root / "images" / os.fsdecode(b"caf\xe9.png"))           # a Latin-1 name
    out = tmp_path / "out"
    rc = main(["--input", str(root), "--labels", str(root / "labels"), "--ignore-index", "11",
               "--vocabulary", CAMVID, "--output", str(out)] + model_flags(tiny_model))
    assert rc == 0
    rows = read_predictions(str(out)).to_pylist()
    assert sorted(r["status"] for r in rows) == ["error", "ok", "ok"]       # the labels are no inputs
    bad = next(r for r in rows if r["status"] == "error")
    assert bad["image_uri"] == "not-utf8:" + str(root / "images") + "/caf\\xe9.png"
    assert "not valid UTF-8" in bad["error"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["images_failed"] == 1


def test_pseudo_labels_with_limit_write_a_report(ray_local, tiny_model, tmp_path):
    from jobs.segment_dataset import main

    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(4):
        Image.fromarray((np.random.default_rng(i).random((50, 70, 3)) * 255).astype(np.uint8)).save(src / f"{i}.png")
    out = tmp_path / "pl"
    rc = main(["--input", str(src), "--limit", "2", "--vocabulary", "sky; road", "--output", str(out)]
              + model_flags(tiny_model))
    assert rc == 0
    rows = read_predictions(str(out)).to_pylist()
    assert len(rows) == 2
    plain = resolve_inputs(str(src))                      # --limit keeps the ids of a plain --input run
    assert [r["image_id"] for r in rows] == [image_id(it["image_uri"], plain.root) for it in plain.items[:2]]
    report = (out / "report.md").read_text()
    assert "confidence" in report.lower() and (out / "figures").is_dir()
    clear_outputs(str(out), None)                         # --overwrite removes all a pseudo-labelling run wrote
    assert not list(out.iterdir())
    assert main(["--data-root", "x", "--output", str(tmp_path / "bad"), "--vocabulary", "a"]
                + model_flags(tiny_model)) == 2              # --data-root without --benchmark: clear error


def test_job_with_unreachable_default_weights_fails_fast(tmp_path, monkeypatch, capsys):
    from jobs.segment_dataset import main

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")           # deterministic with or without a network
    src = tmp_path / "imgs"
    src.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(src / "a.png")
    rc = main(["--input", str(src), "--output", str(tmp_path / "out" / "run"), "--vocabulary", "sky; road",
               "--no-progress"])
    assert rc == 2
    assert "weights=PATH" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()               # refused before writing anything: no empty folders left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")    # a folder that was there stays, with its files
    assert main(["--input", str(src), "--output", str(tmp_path / "mine"), "--vocabulary", "sky; road"]) == 2
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert main(["--input", str(src), "--output", str(tmp_path / "empty"), "--vocabulary", "sky; road"]) == 2
    assert (tmp_path / "empty").is_dir()


def _labelled_folder(tmp_path, n=4, shape=(40, 60)):
    images, labels = tmp_path / "img", tmp_path / "lab"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((*shape, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
        Image.fromarray(rng.integers(0, 12, shape).astype(np.uint8)).save(labels / f"{i}.png")  # 11 = void
    return images, labels


def test_labels_outside_the_classes_fail_before_the_run(ray_local, tiny_model, tmp_path, capsys):
    """CamVid's void value 11 without --ignore-index 11: the first label is checked in the driver."""
    from jobs.segment_dataset import main

    images, labels = _labelled_folder(tmp_path, n=2)
    out = tmp_path / "out"
    rc = main(["--input", str(images), "--labels", str(labels), "--vocabulary", CAMVID, "--output", str(out)]
              + model_flags(tiny_model))
    err = capsys.readouterr().err
    assert rc == 2 and "can't be scored" in err and "[11] are outside [0, 11)" in err
    assert "it is the ignore index (jobs/segment_dataset.py: --ignore-index 11)" in err
    assert not out.exists()                              # nothing written, no empty folder left


def test_a_bad_label_mid_run_stops_it_and_failed_images_are_counted_across_reruns(ray_local, tiny_model, tmp_path,
                                                                                  capsys):
    from jobs.segment_dataset import main

    images, labels = _labelled_folder(tmp_path)
    (images / "1.png").write_bytes(b"not an image")                       # an image error: a row, the run goes on
    good = (labels / "3.png").read_bytes()
    Image.fromarray(np.full((40, 60), 99, np.uint8)).save(labels / "3.png")   # a label error: the run stops
    out = tmp_path / "out"
    argv = (["--input", str(images), "--labels", str(labels), "--ignore-index", "11", "--vocabulary", CAMVID,
             "--output", str(out), "--shard-size", "1"] + model_flags(tiny_model))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "3.png" in err and "[99]" in err and "stops" in err
    assert not (out / "metrics.json").exists() and not (out / "summary.json").exists()
    committed = {r["image_uri"].rsplit("/", 1)[-1] for r in read_predictions(str(out)).to_pylist()} \
        if (out / "predictions").exists() and list((out / "predictions").glob("*.parquet")) else set()
    assert "3.png" not in committed

    (labels / "3.png").write_bytes(good)                                 # fixed: the re-run finishes the job
    assert main(argv) == 0
    captured = capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["images_failed"] == 1
    assert "1.png" in metrics["failed_examples"][0] and "1.png" in (out / "metrics.md").read_text()
    assert "1 images could not be segmented" in captured.err
    rows = read_predictions(str(out)).to_pylist()
    assert sorted(r["image_uri"].rsplit("/", 1)[-1] for r in rows) == ["0.png", "1.png", "2.png", "3.png"]

    assert main(argv) == 0                                               # nothing left to do: same figures
    again = json.loads((out / "metrics.json").read_text())
    assert again["images_failed"] == 1 and again["mIoU"] == metrics["mIoU"]


def test_first_label_check_covers_decoders_that_do_not_check_themselves(tmp_path):
    from pipeline.job import LabelError, check_first_label
    from pipeline.job_config import LabelSpec

    (tmp_path / "l.png").write_bytes(b"x")
    items = [{"image_uri": "a.png", "label_uri": None}, {"image_uri": "b.png", "label_uri": str(tmp_path / "l.png")}]
    spec = LabelSpec(decode_label=lambda data: np.array([[0, 2, 255, 7]]), num_classes=3)
    with pytest.raises(LabelError, match=r"values \[7\] outside the 3 classes"):
        check_first_label(spec, items)
    check_first_label(LabelSpec(decode_label=lambda data: np.array([[0, 2, 255]]), num_classes=3), items)
    with pytest.raises(LabelError, match="can't be scored"):
        check_first_label(spec, [{"image_uri": "a.png", "label_uri": str(tmp_path / "missing.png")}])


def test_a_run_stopped_before_any_commit_may_rerun_with_another_ignore_index(ray_local, tiny_model, tmp_path,
                                                                               capsys):
    """The first label has no void pixels, a later one has: the run stops before its only shard commits,
    and the same command with --ignore-index 11 is not refused (nothing was done under the old config)."""
    from jobs.segment_dataset import main

    images, labels = _labelled_folder(tmp_path, n=2)
    Image.fromarray(np.random.default_rng(1).integers(0, 11, (40, 60)).astype(np.uint8)).save(labels / "0.png")
    out = tmp_path / "out"
    argv = (["--input", str(images), "--labels", str(labels), "--vocabulary", CAMVID, "--output", str(out)]
            + model_flags(tiny_model))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"label {labels / '1.png'}" in err and "--ignore-index needs --overwrite once shards" in err
    assert main(argv + ["--ignore-index", "11"]) == 0
    assert json.loads((out / "metrics.json").read_text())["images"] == 2


def _camvid_manifest(tmp_path, n=3, drop_label_of=None):
    """A Parquet manifest of CamVid images and labels whose names do not match (so only the manifest pairs
    them), with relative entries: ``(manifest, {image_uri: label file})``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = shared_data_dir() / "camvid-val"
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    rows, truth = [], {}
    for i, p in enumerate(sorted((data / "val").iterdir())[:n]):
        shutil.copy(p, tmp_path / "img" / p.name)
        shutil.copy(data / "valannot" / p.name, tmp_path / "gt" / f"label-{i}.png")
        rows.append({"image_uri": f"img/{p.name}", "label_uri": None if i == drop_label_of else f"gt/label-{i}.png"})
        truth[str(tmp_path / "img" / p.name)] = tmp_path / "gt" / f"label-{i}.png"
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest, truth


def test_labels_from_a_parquet_manifest(ray_local, tiny_model, tmp_path):
    """Scored against the manifest's pairs; --limit checks only the rows it keeps (the last one has no label)."""
    from jobs.segment_dataset import main

    manifest, truth = _camvid_manifest(tmp_path, n=4, drop_label_of=3)
    out = tmp_path / "out"
    rc = main(["--input", str(manifest), "--labels-from-manifest", "--ignore-index", "11", "--vocabulary", CAMVID,
               "--limit", "3", "--output", str(out)] + model_flags(tiny_model))
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["images_failed"] == 0
    correct = total = 0
    for row in read_predictions(str(out)).to_pylist():
        with Image.open(__import__("io").BytesIO(row["mask_png"])) as m:
            pred = np.asarray(m).astype(np.int64)
        gt = np.asarray(Image.open(truth[row["image_uri"]])).astype(np.int64)
        keep = gt != 11
        correct += int((pred[keep] == gt[keep]).sum())
        total += int(keep.sum())
    assert metrics["aAcc"] == pytest.approx(100.0 * correct / total, abs=1e-6)


@pytest.mark.parametrize("case, message", [
    ("folder", "needs a Parquet or CSV manifest as --input, not a folder"),
    ("unlabelled", "1 of 3 manifest entries have no label_uri"),
    ("both", "give --labels or --labels-from-manifest, not both"),
    ("text", "the manifest has no label_uri values"),
    ("two labels", "is listed twice with different labels"),
])
def test_labels_from_manifest_refuses_what_it_cannot_score(case, message, tiny_model, tmp_path, capsys):
    from jobs.segment_dataset import main

    manifest, truth = _camvid_manifest(tmp_path, drop_label_of=1 if case == "unlabelled" else None)
    if case == "text":
        manifest = tmp_path / "list.txt"
        manifest.write_text("\n".join(truth) + "\n")
    if case == "two labels":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = pq.read_table(manifest).to_pylist()
        pq.write_table(pa.Table.from_pylist(rows + [dict(rows[0], label_uri="gt/label-1.png")]), manifest)
    args = ["--input", str(tmp_path / "img" if case == "folder" else manifest), "--labels-from-manifest",
            "--vocabulary", CAMVID, "--output", str(tmp_path / "out")] + model_flags(tiny_model)
    if case == "both":
        args += ["--labels", str(tmp_path / "gt")]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "run.json").exists()


@pytest.mark.parametrize("overwrite, cleared", [(False, False), (True, False), (True, True)])
def test_ctrl_c_message_never_advises_rerunning_an_overwrite(overwrite, cleared, tiny_model, tmp_path, monkeypatch,
                                                             capsys):
    """After Ctrl-C the job says how to finish. Once --overwrite has cleared the old outputs, re-running it would
    delete what this run kept; before that, dropping it would resume the outputs the user meant to discard."""
    import jobs.segment_dataset as cli

    def interrupted(cfg):
        if cleared:
            cfg.overwrite = False                     # what run_record.start_or_resume does once it cleared
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    args = ["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--vocabulary", "sky; road"]
    rc = cli.main(args + (["--overwrite"] if overwrite else []) + model_flags(tiny_model))
    err = capsys.readouterr().err
    assert rc == 130 and "the shards committed so far are kept" in err
    assert ("without --overwrite" in err) == cleared


def test_overwrite_is_spent_once_the_outputs_are_cleared(tiny_model, tmp_path):
    from conftest import pipeline_job_config
    from pipeline import run_record, sinks

    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "shard-00000.parquet").write_bytes(b"old")
    cfg = pipeline_job_config(tiny_model, input="x", output=str(out), overwrite=True)
    probe = {"config": {"settings": {k: None for k in run_record.EXECUTION_SETTINGS}}, "class_names": ["a"]}
    assert run_record.start_or_resume(cfg, [], {"input": "x"}, probe).pending == []
    assert cfg.overwrite is False and not (out / "predictions" / "shard-00000.parquet").exists()
    assert sinks.read_json(str(out), None, sinks.RUN_JSON)["config"] == {"input": "x"}


def test_a_benchmarks_own_label_files_given_with_labels_score_as_under_data_root(ray_local, tiny_model, tmp_path,
                                                                                 caplog, capsys):
    """--benchmark ade20k --labels <ADE20K's annotations> --label-encoding benchmark decodes them as ADE20K
    does (reduce_zero_label): the same confusion matrix as --data-root. Read as class indices, 'other' (0)
    would be scored as 'wall'; as the two readings differ, the flag is required."""
    from jobs.segment_dataset import main

    data = shared_data_dir() / "ade20k-mini"
    common = ["--limit", "2"] + model_flags(tiny_model)
    labelled = ["--benchmark", "ade20k", "--input", str(data / "images" / "validation"), "--labels",
                str(data / "annotations" / "validation")]
    assert main(labelled + ["--output", str(tmp_path / "unsaid")] + common) == 2
    assert "say which your labels are, --label-encoding benchmark" in capsys.readouterr().err
    assert not (tmp_path / "unsaid").exists()
    assert main(["--benchmark", "ade20k", "--data-root", str(data), "--output", str(tmp_path / "root")] + common) == 0
    with caplog.at_level("INFO", logger="segment_dataset"):
        assert main(labelled + ["--label-encoding", "benchmark", "--output", str(tmp_path / "labels")] + common) == 0
    assert "decoded as ade20k's annotation files are (reduce_zero_label)" in caplog.text
    root, labels = (np.load(tmp_path / d / "metrics" / "confusion.npy") for d in ("root", "labels"))
    np.testing.assert_array_equal(root, labels)
    raw = np.asarray(Image.open(sorted((data / "annotations" / "validation").iterdir())[0]))
    assert (raw == 0).any()                                    # 'other' pixels exist and were ignored, not scored
    assert json.loads((tmp_path / "labels" / "run.json").read_text())["config"]["labels"]["label_transform"] == \
        "reduce_zero_label"
    assert main(labelled + ["--label-encoding", "indices", "--output", str(tmp_path / "indices")] + common) == 0
    assert not np.array_equal(np.load(tmp_path / "indices" / "metrics" / "confusion.npy"), root)   # raw values
    capsys.readouterr()
    assert main(labelled + ["--label-encoding", "benchmark", "--ignore-index", "0", "--output",
                            str(tmp_path / "other")] + common) == 2
    assert "does not apply" in capsys.readouterr().err
    assert main(["--benchmark", "ade20k", "--data-root", str(data), "--label-encoding", "indices", "--output",
                 str(tmp_path / "other")] + common) == 2
    assert "--label-encoding says how --labels" in capsys.readouterr().err
