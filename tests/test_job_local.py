"""End to end on local files: rows, masks, bad files, run.json/summary.json, resume rules, fail-fast."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline import sinks
from pipeline.metrics import load_shard_confusions
import pytest
import rfclip
from rfclip.weights import OPENAI_MEAN
from PIL import Image

from conftest import (pipeline_cli_args, pipeline_job_config, plant_bad_and_odd_images, read_predictions,
                      write_images)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 random images + the planted bad/odd files: (folder, expectations by file name)."""
    root = tmp_path_factory.mktemp("corpus")
    write_images(root / "good", 6, seed=3)
    expect = plant_bad_and_odd_images(root / "odd")
    Image.new("RGB", (40, 30)).save(root / "odd" / os.fsdecode(b"caf\xe9.jpg"))     # a Latin-1 name, not UTF-8
    expect["caf\\xe9.jpg"] = ("error", "file name is not valid UTF-8")               # listed with the byte escaped
    return root, expect


@pytest.fixture(scope="module")
def first_run(ray_local, tiny_model, corpus, tmp_path_factory):
    from pipeline.job import run

    root, _ = corpus
    out = tmp_path_factory.mktemp("out") / "run"
    cfg = pipeline_job_config(tiny_model, input=str(root), output=str(out), save_masks=True)
    summary = run(cfg)
    return cfg, out, summary


def test_every_input_gets_exactly_one_row_with_the_right_status(first_run, corpus):
    cfg, out, summary = first_run
    root, expect = corpus
    t = read_predictions(str(out))
    n_inputs = 6 + len(expect)
    assert t.num_rows == n_inputs
    uris = t.column("image_uri").to_pylist()
    assert len(set(uris)) == n_inputs
    assert len(set(t.column("image_id").to_pylist())) == n_inputs
    by_name = {u.rsplit("/", 1)[1]: r for u, r in zip(uris, t.to_pylist())}
    for name, (status, what) in expect.items():
        row = by_name[name]
        assert row["status"] == status, (name, row["error"])
        if status == "error":
            assert re.search(what, row["error"]), (name, row["error"])
            assert row["mask_png"] is None and row["error"]
        else:
            assert row["error"] is None
            assert (row["height"], row["width"]) == what, name
    n_err = sum(1 for s, _ in expect.values() if s == "error")
    assert summary["ok"] == n_inputs - n_err and summary["error"] == n_err and summary["skipped"] == 0
    assert summary["rows_decoded_in_model_process"] == 0      # decoding ran in CPU tasks, not the actor


def test_masks_decode_to_image_size_and_class_pixels_add_up(first_run):
    cfg, out, _ = first_run
    t = read_predictions(str(out))
    ok = [r for r in t.to_pylist() if r["status"] == "ok"]
    assert ok
    for r in ok:
        lab = np.asarray(Image.open(io.BytesIO(r["mask_png"])))
        assert lab.shape == (r["height"], r["width"])
        assert lab.max() < 3
        assert len(r["class_pixels"]) == 3 and sum(r["class_pixels"]) == r["height"] * r["width"]
        np.testing.assert_array_equal(np.bincount(lab.ravel(), minlength=3), r["class_pixels"])
        assert 0.0 < r["mean_confidence"] <= 1.0 and r["elapsed_ms"] > 0
        saved = np.asarray(Image.open(out / "masks" / f"{r['image_id']}.png"))
        np.testing.assert_array_equal(saved, lab)                      # --save-masks: palette PNG, same labels
        assert Image.open(out / "masks" / f"{r['image_id']}.png").mode == "P"
        assert Image.open(out / "masks" / f"{r['image_id']}.png").getpalette()[:3] != [0, 0, 0]   # sky is not black
    assert len(list((out / "masks").iterdir())) == len(ok)


def test_reading_the_output_back_gives_the_class_names_rows_and_label_maps(first_run, tmp_path):
    from pipeline.outputs import class_names, iter_labels, read_predictions as read_back

    cfg, out, summary = first_run
    assert class_names(str(out)) == ["sky", "road", "car"]               # "sky, cloud": the first synonym names it
    want = read_predictions(str(out))
    got = read_back(str(out), columns=["image_uri", "status", "width", "height"])
    assert got.column_names == ["image_uri", "status", "width", "height"]
    assert got.to_pylist() == want.select(got.column_names).to_pylist()
    assert read_back(str(out)).column_names == sinks.PREDICTION_SCHEMA.names
    with pytest.raises(ValueError, match="unknown columns"):
        read_back(str(out), columns=["image_uri", "labels"])
    ok = {r["image_id"]: r for r in want.to_pylist() if r["status"] == "ok"}
    seen = []
    for image_id, uri, labels in iter_labels(str(out)):
        r = ok[image_id]
        assert uri == r["image_uri"] and labels.shape == (r["height"], r["width"]) and labels.dtype == np.int64
        np.testing.assert_array_equal(np.bincount(labels.ravel(), minlength=3), r["class_pixels"])
        seen.append(image_id)
    assert sorted(seen) == sorted(ok) and len(seen) == summary["ok"]   # every ok image once, no error row

    partial = tmp_path / "partial"                                       # a run cut short: what is committed
    shutil.copytree(out, partial)
    shards = sorted((partial / "predictions").glob("shard-*.parquet"))
    shards[-1].rename(partial / "predictions" / f".tmp-0123456789ab-{shards[-1].name}")
    assert read_back(str(partial)).num_rows == want.num_rows - pq.read_metadata(shards[-1].with_name(
        f".tmp-0123456789ab-{shards[-1].name}")).num_rows
    for f in partial.glob("predictions/shard-*.parquet"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        read_back(str(partial))
    (partial / "run.json").unlink()
    with pytest.raises(FileNotFoundError, match="not the output of"):
        class_names(str(partial))


def test_mask_matches_an_in_process_segmenter(first_run, tiny_model):
    """The pipeline's label map equals Segmenter.segment_batch on the same decoded, resized image."""
    import rfclip
    from pipeline.job_config import segmenter_kwargs
    from rfclip.decode import decode_image

    cfg, out, _ = first_run
    row = next(r for r in read_predictions(str(out)).to_pylist() if r["image_uri"].endswith("img000.png"))
    seg = rfclip.Segmenter(**segmenter_kwargs(cfg), device="cpu")
    rgb = decode_image(open(row["image_uri"], "rb").read())
    small = rfclip.images.resize_short_side(rgb, seg.settings.short_side, seg.settings.max_long_side)
    want = seg.segment_batch([small], original_sizes=[rgb.shape[:2]])[0].labels
    got = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
    assert (got == want).mean() > 0.999


def test_run_json_and_summary(first_run):
    cfg, out, summary = first_run
    run_doc = json.loads((out / "run.json").read_text())
    seg = run_doc["config"]["segmenter"]
    assert seg["method"] == "rfclip" and seg["vocabulary"] == [["sky", "cloud"], ["road"], ["car"]]
    assert re.fullmatch(r"[0-9a-f]{64}", seg["weights"]["sha256"])
    assert seg["settings"]["short_side"] == 64
    assert run_doc["config"]["num_inputs"] == summary["images_total"]
    assert run_doc["versions"]["ray"] and run_doc["versions"]["torch"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["ok"] == summary["ok"] and on_disk["images_per_second"] > 0
    # What ran, as resolved on the worker (not "auto"): in summary.json and in every shard's metadata.
    ran = [{"device": "cpu", "plan": "explicit", "attention_kernels": "torch", "ncut_kernels": "torch",
            "distractors": {"dims": [3, 7], "tau": 5 / 64, "min_received_attention": None}, "fallbacks": []}]
    assert on_disk["execution"] == summary["execution"] == ran
    assert run_doc["runtime"]["execution_settings"] == {"plan": "auto", "attention_kernels": "auto",
                                                        "ncut_kernels": "torch"}
    assert "plan" not in seg["settings"] and "attention_kernels" not in seg["settings"]
    for shard in (out / "predictions").iterdir():
        meta, _ = sinks.parse_shard_metadata(pq.read_schema(shard).metadata)
        assert meta["execution"] == ran
    assert not list(out.rglob(".tmp-*"))


def test_rerun_skips_committed_shards_and_refuses_a_changed_config(first_run, tiny_model):
    from pipeline.job import run
    from pipeline.run_record import ConfigMismatch

    cfg, out, first = first_run
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "predictions").iterdir()}
    again = run(cfg)
    assert again["skipped"] == first["images_total"] and again["ok"] == 0 and again["shards_committed_this_run"] == 0
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "predictions").iterdir()}
    assert after == before
    # summary.json still says what the output holds, read from the shards' footers
    whole = {"images": first["images_total"], "ok": first["ok"], "error": first["error"]}
    assert first["output"] == again["output"] == whole and again["shards_redone_damaged"] == []
    assert json.loads((out / "summary.json").read_text())["output"] == whole
    changed = pipeline_job_config(tiny_model, input=cfg.input, output=cfg.output, save_masks=True,
                                  vocabulary="sky; road; car")
    with pytest.raises(ConfigMismatch, match=r"(?s)vocabulary.*--overwrite"):
        run(changed)
    smaller = pipeline_job_config(tiny_model, input=cfg.input, output=cfg.output, save_masks=True, shard_size=3)
    with pytest.raises(ConfigMismatch, match="shard_size: 4 -> 3"):
        run(smaller)


def test_a_shard_damaged_after_its_commit_is_redone_and_the_others_are_kept(first_run, tmp_path, caplog):
    """A committed shard cut short afterwards (an interrupted copy, a full disk) is not counted as done: a
    re-run warns, redoes that shard alone, and the output is whole again."""
    from pipeline.job import run

    cfg, out, first = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shards = sorted((copy / "predictions").iterdir())
    assert len(shards) >= 2
    want = pq.read_table(shards[0]).to_pylist()
    damaged = shards[0].read_bytes()
    shards[0].write_bytes(damaged[: len(damaged) // 2])                 # truncated: no footer
    kept = {p.name: p.read_bytes() for p in shards[1:]}
    caplog.set_level(logging.WARNING)
    again = run(dataclasses.replace(cfg, output=str(copy)))
    name = shards[0].stem
    assert again["shards_redone_damaged"] == [name] and again["shards_committed_this_run"] == 1
    assert again["ok"] + again["error"] == len(want) and again["skipped"] == first["images_total"] - len(want)
    assert again["output"] == first["output"]
    assert any(name in r.getMessage() and "damaged after its commit" in r.getMessage() for r in caplog.records)
    redone = pq.read_table(shards[0]).to_pylist()
    assert [r["image_uri"] for r in redone] == [r["image_uri"] for r in want]
    assert [r["status"] for r in redone] == [r["status"] for r in want]
    assert {p.name: p.read_bytes() for p in shards[1:]} == kept
    assert read_predictions(str(copy)).num_rows == first["images_total"]


def test_shards_that_hold_other_images_than_their_name_says_are_refused(first_run, tmp_path):
    """Each committed shard's footer records the digest of its images: shard files swapped or copied in from
    another run are refused, not counted as this input's."""
    from pipeline.job import run
    from pipeline.run_record import ConfigMismatch

    cfg, out, _ = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    a, b = sorted((copy / "predictions").iterdir())[:2]
    data_a = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data_a)
    with pytest.raises(ConfigMismatch, match=rf"other images.*{a.stem}"):
        run(dataclasses.replace(cfg, output=str(copy)))


def test_rerun_with_the_input_spelled_another_way_resumes(first_run, tiny_model, tmp_path, monkeypatch):
    """run.json records the resolved input, so ./in/, in, file:///abs/in resume; so does an older run.json
    that holds --input as typed. One from before ids were relative to the input root for items is refused."""
    from pipeline.job import run
    from pipeline.run_record import ConfigMismatch

    cfg, out, first = first_run
    root = Path(cfg.input)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    monkeypatch.chdir(root.parent)
    for spelling in (f"./{root.name}/", root.name, f"file://{root}", f"{root}/"):
        again = run(pipeline_job_config(tiny_model, input=spelling, output=str(copy), save_masks=True))
        assert again["skipped"] == first["images_total"] and again["ok"] == 0, spelling
        assert json.loads((copy / "run.json").read_text())["config"]["input"] == str(root)
    for recorded, ok in ((root.name, True), ("<items>", False)):
        doc = json.loads((copy / "run.json").read_text())
        doc["config"]["input"] = recorded                                  # as an older run.json has it
        (copy / "run.json").write_text(json.dumps(doc))
        resumed = pipeline_job_config(tiny_model, input=str(root), output=str(copy), save_masks=True)
        if ok:
            assert run(resumed)["skipped"] == first["images_total"]
        else:
            with pytest.raises(ConfigMismatch, match=r"(?s)input: \"<items>\".*their ids differ"):
                run(resumed)


def test_rerun_with_the_model_and_weights_spelled_another_way_resumes(first_run, tiny_model, tmp_path, monkeypatch):
    """run.json holds --model and --weights as typed. The same files reached by another path resume (the
    weights by their sha256, the model config by its contents); other weights are still refused."""
    from pipeline.job import run
    from pipeline.run_record import ConfigMismatch

    cfg, out, first = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    model, weights = Path(tiny_model[0]), Path(tiny_model[1])
    monkeypatch.chdir(model.parent)
    spelled = (f"../{model.parent.name}/{model.name}", weights.name)           # relative, one through ".."
    again = run(pipeline_job_config(spelled, input=cfg.input, output=str(copy), save_masks=True))
    assert again["skipped"] == first["images_total"] and again["ok"] == 0
    renamed = tmp_path / "renamed-config.json"                 # same contents, another name (so another arch name)
    renamed.write_bytes(model.read_bytes())
    again = run(pipeline_job_config((str(renamed), str(weights)), input=cfg.input, output=str(copy), save_masks=True))
    assert again["skipped"] == first["images_total"] and again["ok"] == 0
    other = tmp_path / weights.name
    other.write_bytes(weights.read_bytes() + b"\0")            # a zip archive reads the same with a byte appended
    with pytest.raises(ConfigMismatch, match="segmenter.weights.sha256"):
        run(pipeline_job_config((str(model), str(other)), input=cfg.input, output=str(copy), save_masks=True))


def test_run_json_input_decides_the_image_ids(tmp_path, monkeypatch):
    """run.json's input is the root of the image ids (or the manifest, or "<items>" for items given without
    an input), so two runs with the same identity give an image the same id."""
    from pipeline import sources
    from pipeline.job_config import JobConfig
    from pipeline.run_record import identity

    items = [{"image_uri": str(tmp_path / "in" / "a.jpg"), "label_uri": None}]
    monkeypatch.chdir(tmp_path)
    folder = sources.Inputs(items, str(tmp_path / "in"), "folder")
    assert identity(JobConfig(output="o", input="./in/"), folder, {})["input"] == str(tmp_path / "in")
    limited = sources.inputs_from_items(items, str(tmp_path / "in"))        # --limit over the same folder
    assert identity(JobConfig(output="o", input="in", items=items), limited, {})["input"] == str(tmp_path / "in")
    rootless = sources.inputs_from_items(items)                             # a manifest cut by --limit
    assert identity(JobConfig(output="o", input="list.txt", items=items), rootless, {})["input"] == \
        str(tmp_path / "list.txt")                                          # whole URIs hashed, as without it
    assert identity(JobConfig(output="o", items=items), rootless, {})["input"] == "<items>"   # API items
    manifest = sources.Inputs(items, None, "manifest")
    assert identity(JobConfig(output="o", input="./list.txt"), manifest, {})["input"] == str(tmp_path / "list.txt")


def test_rerun_may_change_how_the_model_runs_but_not_what_it_computes(first_run, tiny_model, tmp_path):
    """plan, attention_kernels and ncut_kernels pick how the forward runs (the results agree to float rounding), like the
    device: a resume may change them, also from a run.json written when they were part of the identity."""
    from pipeline.job import run
    from pipeline.run_record import ConfigMismatch

    cfg, out, first = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    doc = json.loads((copy / "run.json").read_text())
    doc["config"]["segmenter"]["settings"].update(plan="auto", attention_kernels="torch")   # an older run.json
    (copy / "run.json").write_text(json.dumps(doc))
    settings = {**cfg.settings, "plan": "fused", "attention_kernels": "torch"}
    again = run(pipeline_job_config(tiny_model, input=cfg.input, output=str(copy), save_masks=True,
                                    settings=settings))
    assert again["skipped"] == first["images_total"] and again["execution"] == []      # nothing ran this time
    assert json.loads((copy / "run.json").read_text())["runtime"]["execution_settings"] == {
        "plan": "fused", "attention_kernels": "torch", "ncut_kernels": "torch"}
    with pytest.raises(ConfigMismatch, match="lam: 0.7 -> 0.5"):                        # what it computes
        run(pipeline_job_config(tiny_model, input=cfg.input, output=str(copy), settings={**settings, "lam": 0.5}))


def test_rerun_of_a_run_json_without_the_normalisation_resumes_but_another_normalisation_is_refused(
        first_run, tiny_model, tmp_path):
    """run.json files from before the image mean/std were recorded used OpenAI's: they resume. A run asked
    for another normalisation computes something else, and is refused."""
    from pipeline.job import run
    from pipeline.run_record import ConfigMismatch

    cfg, out, first = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    doc = json.loads((copy / "run.json").read_text())
    weights = doc["config"]["segmenter"]["weights"]
    assert weights["image_mean"] == list(OPENAI_MEAN)
    del weights["image_mean"], weights["image_std"]                    # as an older run.json has it
    (copy / "run.json").write_text(json.dumps(doc))
    again = run(pipeline_job_config(tiny_model, input=cfg.input, output=str(copy), save_masks=True))
    assert again["skipped"] == first["images_total"] and again["ok"] == 0
    with pytest.raises(ConfigMismatch, match="image_mean"):
        run(pipeline_job_config(tiny_model, input=cfg.input, output=str(copy), image_mean=(0.5, 0.5, 0.5),
                                image_std=(0.5, 0.5, 0.5)))


def test_a_resume_under_other_versions_warns_and_keeps_their_record(first_run, tiny_model, tmp_path, caplog):
    """Shards written by another output revision or package version are kept, with a warning and a record
    in run.json; a run.json from before the revision was recorded counts as revision 1 without the image
    normalisation, 2 with it (both came in one change)."""
    from pipeline.job import run
    from pipeline.run_record import versions

    cfg, out, first = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    doc = json.loads((copy / "run.json").read_text())
    assert doc["versions"] == versions() and doc["earlier_versions"] == []
    older = {k: v for k, v in doc["versions"].items() if k != "rfclip_output_revision"}
    (copy / "run.json").write_text(json.dumps({**doc, "versions": older}))     # revision 2, as its config says
    caplog.set_level(logging.WARNING)
    run(pipeline_job_config(tiny_model, input=cfg.input, output=str(copy), save_masks=True))
    assert not [r for r in caplog.records if "other versions" in r.getMessage()]
    doc = json.loads((copy / "run.json").read_text())
    assert doc["earlier_versions"] == []
    older["torch"] = "2.0.0"
    del doc["config"]["segmenter"]["weights"]["image_mean"], doc["config"]["segmenter"]["weights"]["image_std"]
    (copy / "run.json").write_text(json.dumps({**doc, "versions": older}))     # revision 1: no normalisation
    caplog.clear()
    again = run(pipeline_job_config(tiny_model, input=cfg.input, output=str(copy), save_masks=True))
    assert again["skipped"] == first["images_total"]
    warned = [r.getMessage() for r in caplog.records if "other versions" in r.getMessage()]
    assert len(warned) == 1 and f"rfclip_output_revision 1 -> {rfclip.OUTPUT_REVISION}" in warned[0]
    assert "torch 2.0.0 -> " in warned[0] and "--overwrite" in warned[0]
    doc = json.loads((copy / "run.json").read_text())
    assert doc["earlier_versions"] == [older] and doc["versions"] == versions()
    caplog.clear()
    run(pipeline_job_config(tiny_model, input=cfg.input, output=str(copy), save_masks=True))   # same versions now
    assert not [r for r in caplog.records if "other versions" in r.getMessage()]
    assert json.loads((copy / "run.json").read_text())["earlier_versions"] == [older]


def test_overwrite_starts_over(first_run, tiny_model, tmp_path):
    from pipeline.job import run

    cfg, out, first = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    # A run the cluster refuses (here decode tasks no node can hold) is refused before the old outputs go.
    refused = pipeline_job_config(tiny_model, input=cfg.input, output=str(copy), overwrite=True, max_pixels=10**12)
    with pytest.raises(ValueError, match="--max-pixels"):
        run(refused)
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
    cfg2 = pipeline_job_config(tiny_model, input=cfg.input, output=str(copy), vocabulary="sky; road", overwrite=True)
    s = run(cfg2)
    assert s["skipped"] == 0 and s["ok"] + s["error"] == first["images_total"]
    assert not (copy / "masks").exists()                         # old --save-masks output removed
    assert json.loads((copy / "run.json").read_text())["config"]["segmenter"]["vocabulary"] == [["sky"], ["road"]]


def test_labelled_inputs_store_a_confusion_matrix_per_shard(ray_local, tiny_model, tmp_path):
    """The evaluation hook: items with label_uri + LabelSpec -> each shard carries its K x K matrix."""
    from pipeline.job import run
    from pipeline.job_config import LabelSpec

    imgs = write_images(tmp_path / "img", 5, seed=7)
    items = []
    rng = np.random.default_rng(0)
    for p in imgs:
        h, w = np.asarray(Image.open(p)).shape[:2]
        gt = rng.integers(0, 3, (h, w)).astype(np.uint8)
        gt[:2] = 255                                             # ignored rows
        lp = p.with_suffix(".label.png")
        Image.fromarray(gt).save(lp)
        items.append({"image_uri": str(p), "label_uri": str(lp)})

    def decode(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)

    spec = LabelSpec(decode_label=decode, num_classes=3, ignore_index=255, identity={"kind": "test"})
    out = tmp_path / "eval"
    s = run(pipeline_job_config(tiny_model, output=str(out), items=items, labels=spec))
    assert s["ok"] == 5
    total = load_shard_confusions(str(out))["confusion"]
    t = read_predictions(str(out))
    label_of = {i["image_uri"]: i["label_uri"] for i in items}
    want = np.zeros((3, 3), np.int64)
    for r in t.to_pylist():
        pred = np.asarray(Image.open(io.BytesIO(r["mask_png"]))).astype(np.int64)
        gt = decode(open(label_of[r["image_uri"]], "rb").read())
        keep = gt != 255
        want += np.bincount(3 * gt[keep] + pred[keep], minlength=9).reshape(3, 3)
    np.testing.assert_array_equal(total, want)
    assert total.sum() == sum((r["height"] - 2) * r["width"] for r in t.to_pylist())


def test_an_output_inside_the_input_folder_is_not_an_input(ray_local, tiny_model, tmp_path, capsys):
    """--input data --output data/out: the job's masks and figures are not inputs, so a re-run resumes."""
    from jobs.segment_dataset import main

    data = tmp_path / "data"
    write_images(data, 3, seed=11)
    out = data / "out"
    args = ["--input", str(data), "--output", str(out), "--save-masks"] + pipeline_cli_args(tiny_model)
    assert main(args) == 0
    assert len(list((out / "masks").iterdir())) == 3 and list((out / "figures").iterdir())
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["skipped"] == 3
    assert len(read_predictions(str(out))) == 3
    capsys.readouterr()
    assert main(["--input", str(data), "--output", f"{data}/"] + pipeline_cli_args(tiny_model)) == 2
    assert "is the input folder" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "empty", "unwritable"])
def test_fail_fast_with_a_clear_message(case, tiny_model, tmp_path, capsys):
    import os

    from jobs.segment_dataset import main

    inp, out = tmp_path / "in", tmp_path / "out"
    if case != "missing":
        inp.mkdir()
        (inp / "readme.txt").write_text("x")
    if case == "unwritable":
        write_images(inp, 1)
        out = "/proc/rfclip-out" if os.geteuid() == 0 else "/rfclip-out-not-allowed"
    rc = main(["--input", str(inp), "--output", str(out)] + pipeline_cli_args(tiny_model))
    err = capsys.readouterr().err
    assert rc == 2
    assert {"missing": "does not exist", "empty": "contains no images", "unwritable": "not writable"}[case] in err


def test_a_run_whose_every_image_fails_exits_1_and_failures_are_counted_on_stderr(ray_local, tiny_model, tmp_path,
                                                                                  capsys):
    from jobs.segment_dataset import main

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "zero.jpg").write_bytes(b"")
    (inp / "text.png").write_text("not a PNG\n")
    assert main(["--input", str(inp), "--output", str(tmp_path / "out")] + pipeline_cli_args(tiny_model)) == 1
    err = capsys.readouterr().err
    assert "2 of 2 images segmented in this run are error rows" in err and "no image in the output could be segmented" in err
    write_images(inp, 1)                                           # one good image: done, with a warning
    assert main(["--input", str(inp), "--output", str(tmp_path / "out2")] + pipeline_cli_args(tiny_model)) == 0
    assert "2 of 3 images segmented in this run are error rows" in capsys.readouterr().err


def test_what_no_node_here_could_run_is_refused_not_waited_for(ray_local, tiny_model, tmp_path, capsys):
    """A local Ray has no autoscaler: a GPU per worker on a machine without one, or decode tasks reserving
    more memory than any node has, would wait forever. Bad counts are usage errors before any work."""
    import torch

    from jobs.segment_dataset import main

    inp = tmp_path / "in"
    write_images(inp, 2)
    base = ["--input", str(inp), "--output", str(tmp_path / "out")] + pipeline_cli_args(tiny_model)
    if not torch.cuda.is_available():
        assert main(base + ["--num-gpus-per-worker", "1"]) == 2
        assert "--num-gpus-per-worker 0 to run the model on CPU" in capsys.readouterr().err
    assert main(base + ["--workers", "2", "--cpus-per-worker", "1"]) == 2      # ray_local has 2 CPUs
    assert "ask for 2 CPUs, and this machine's Ray has 2, of which the decode and encode tasks need 1" in \
        capsys.readouterr().err
    assert main(base + ["--max-pixels", str(10 ** 12)]) == 2
    assert "lower --max-pixels" in capsys.readouterr().err
    for flag, value, message in (("--decode-batch-size", "0", "must be >= 1"), ("--batch-size", "x", "an integer"),
                                 ("--cpus-per-worker", "-1", "finite number >= 0")):
        with pytest.raises(SystemExit) as e:
            main(base + [flag, value])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_workers_filling_the_cpus_by_default_leave_one_to_decode(ray_local, tiny_model, tmp_path, caplog):
    """Two model actors on ray_local's 2 CPUs: each reserves half of one, so the decode and encode tasks
    still get a CPU (with 1 each, the job waited forever for one)."""
    from jobs.segment_dataset import main

    inp = tmp_path / "in"
    write_images(inp, 3)
    caplog.set_level(logging.INFO)
    assert main(["--input", str(inp), "--output", str(tmp_path / "out"), "--workers", "2"]
                + pipeline_cli_args(tiny_model)) == 0
    assert "2 model workers reserve 0.5 CPUs each" in caplog.text
    assert read_predictions(str(tmp_path / "out")).num_rows == 3


def test_a_damaged_run_json_names_itself_and_the_way_out(ray_local, tiny_model, tmp_path, capsys):
    from jobs.segment_dataset import main

    inp, out = tmp_path / "in", tmp_path / "out"
    write_images(inp, 2)
    out.mkdir()
    (out / "run.json").write_text('{"config": {"input"')                       # cut off mid-write
    args = ["--input", str(inp), "--output", str(out)] + pipeline_cli_args(tiny_model)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "run.json is damaged" in err and "--overwrite" in err
    assert main(args + ["--overwrite"]) == 0


def test_odd_names_reach_the_report_and_an_unreadable_sample_is_left_out(ray_local, tiny_model, tmp_path, caplog):
    """The report reads samples as the job reads images ("::" is no URL chain); a sample gone since the run
    is left out of the figures with a warning, and the report is still written."""
    from pipeline.report import write_report
    from jobs.segment_dataset import main

    inp, out = tmp_path / "in", tmp_path / "out"
    write_images(inp, 2)
    first = next(inp.rglob("*.png"))
    shutil.copy(first, inp / "a::b.png")
    assert main(["--input", str(inp), "--output", str(out)] + pipeline_cli_args(tiny_model)) == 0
    assert (out / "report.md").exists() and "left out" not in caplog.text
    (out / "report.md").unlink()
    (inp / "a::b.png").unlink()
    write_report(str(out), ["sky", "road", "car"])
    assert "left out: FileNotFoundError" in caplog.text and "a::b.png" in caplog.text
    assert (out / "report.md").exists()


def test_labels_in_the_input_folder_itself_are_refused_with_the_way_out(tiny_model, tmp_path, capsys):
    from jobs.segment_dataset import main

    same = tmp_path / "same"
    write_images(same, 2)
    rc = main(["--input", str(same), "--labels", str(same), "--output", str(tmp_path / "out")]
              + pipeline_cli_args(tiny_model))
    assert rc == 2 and "holds the --input images" in capsys.readouterr().err


def test_an_unreachable_ray_address_fails_in_seconds_naming_the_flag(tiny_model, tmp_path, capsys, monkeypatch):
    """ray.init retries a GCS that isn't there for minutes; the job says what is wrong at once."""
    import time

    import ray

    from jobs.segment_dataset import main

    monkeypatch.setattr(ray, "is_initialized", lambda: False)     # as in a fresh driver, whatever ran before
    inp = tmp_path / "in"
    write_images(inp, 1)
    t0 = time.time()
    rc = main(["--input", str(inp), "--output", str(tmp_path / "out"), "--ray-address", "127.0.0.1:1"]
              + pipeline_cli_args(tiny_model))
    err = capsys.readouterr().err
    assert rc == 2 and "can't reach the Ray cluster at 127.0.0.1:1 (--ray-address" in err, err
    assert time.time() - t0 < 60


def test_a_storage_failure_past_the_retries_is_one_line_and_exit_1(tiny_model, tmp_path, capsys, monkeypatch):
    """A write or listing that outlasts the retries (here: the run resets) is said in one line, with exit
    status 1 and the way on; no traceback. A file of the command's own that can't be read is exit 2."""
    import jobs.segment_dataset as job_cli

    inp = tmp_path / "in"
    write_images(inp, 1)
    rc = job_cli.main(["--input", str(inp), "--output", str(tmp_path / "out"), "--vocabulary-file", str(inp)]
                      + pipeline_cli_args(tiny_model)[2:])                 # a folder as the vocabulary file
    err = capsys.readouterr().err
    assert rc == 2 and "is a folder, not a class file" in err and "run the same command again" not in err, err

    def run(cfg):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(job_cli, "run", run)
    rc = job_cli.main(["--input", str(inp), "--output", str(tmp_path / "out")] + pipeline_cli_args(tiny_model))
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert "error: ConnectionResetError: [Errno 104] Connection reset by peer" in err and "run the same command again" in err


def test_labels_naming_a_class_files_background_line_sky_resume_as_background(tmp_path):
    """A labelled run with VOC's class file as its vocabulary recorded class 0 as "sky" before it was named
    "background": the same labels, so it resumes; any other difference in the names is still refused."""
    from types import SimpleNamespace

    from pipeline.run_record import ConfigMismatch, _check_identity

    cfg = SimpleNamespace(storage_options=None, output=str(tmp_path))
    labels = {"num_classes": 3, "ignore_index": 255, "class_names": ["background", "aeroplane", "bicycle"]}
    ident = {"input": str(tmp_path), "num_inputs": 2, "labels": labels, "segmenter": None}
    old = {**ident, "labels": {**labels, "class_names": ["sky", "aeroplane", "bicycle"]}}
    _check_identity(cfg, {"config": old}, ident, {"shard-00000"})
    for names in (["sky", "plane", "bicycle"], ["sky", "aeroplane"]):
        old = {**ident, "labels": {**labels, "class_names": names}}
        with pytest.raises(ConfigMismatch, match="labels.class_names"):
            _check_identity(cfg, {"config": old}, ident, {"shard-00000"})


def test_a_setting_the_method_does_not_use_is_no_reason_to_refuse_a_resume(tmp_path):
    """An evaluation over several methods once passed distraction_dims to clip too: its clip outputs
    resume without it (clip's results never depended on it); for rfclip the same change is refused."""
    from types import SimpleNamespace

    from pipeline.run_record import ConfigMismatch, _check_identity

    cfg = SimpleNamespace(storage_options=None, output=str(tmp_path))

    def ident(method, dims):
        seg = {"method": method, "settings": {"distraction_dims": dims, "lam": 0.7, "logit_scale": 40.0}}
        return {"input": str(tmp_path), "labels": None, "segmenter": seg}

    _check_identity(cfg, {"config": ident("clip", [1, 2])}, ident("clip", None), {"shard-00000"})
    with pytest.raises(ConfigMismatch, match="segmenter.settings.distraction_dims"):
        _check_identity(cfg, {"config": ident("rfclip", [1, 2])}, ident("rfclip", None), {"shard-00000"})
    old = ident("clip", [1, 2])
    old["segmenter"]["settings"]["logit_scale"] = 50.0                  # a setting clip uses: refused
    with pytest.raises(ConfigMismatch, match="logit_scale"):
        _check_identity(cfg, {"config": old}, ident("clip", None), {"shard-00000"})


def test_a_run_that_committed_no_shard_under_another_configuration_leaves_no_files_behind(tmp_path):
    """Its masks were made under the other configuration and belong to no shard: replacing its run.json
    removes them too, and a user's own files stay."""
    from types import SimpleNamespace

    from pipeline.run_record import _check_identity

    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a-0123456789.png").write_bytes(b"x")
    (tmp_path / "notes.md").write_text("mine")
    cfg = SimpleNamespace(storage_options=None, output=str(tmp_path))
    ident = {"input": str(tmp_path), "labels": None, "segmenter": {"method": "clip", "settings": {}}, "save_masks": True}
    _check_identity(cfg, {"config": ident}, ident, set())                   # the same run: its masks are kept
    assert (tmp_path / "masks" / "a-0123456789.png").exists()
    _check_identity(cfg, {"config": {**ident, "save_masks": False}}, ident, set())
    assert not (tmp_path / "masks").exists() and (tmp_path / "notes.md").read_text() == "mine"


def test_an_input_url_with_credentials_is_recorded_without_them_and_resumes(tmp_path):
    """run.json holds the input without the password or token in its URL (the identity is made without
    them), so a resume with the same URL compares equal instead of being refused."""
    from types import SimpleNamespace

    from pipeline import run_record, sources, storage

    url = "http://alice:s3cretpw@127.0.0.1:9/m.csv?token=abcdef"
    cfg = SimpleNamespace(input=url, storage_options=None, shard_size=2, max_pixels=10, save_masks=False,
                          labels=None, output=str(tmp_path))
    inputs = sources.Inputs([{"image_uri": "http://h/a.jpg"}], None, "manifest")
    ident = run_record.identity(cfg, inputs, {"method": "clip", "settings": {}})
    assert ident["input"] == "http://***@127.0.0.1:9/m.csv?***"
    storage.register_url_secrets(url)
    written = storage.redact(ident)                                        # what run.json holds
    assert "s3cretpw" not in json.dumps(written) and "abcdef" not in json.dumps(written)
    run_record._check_identity(cfg, {"config": written}, ident, {"shard-00000"})       # resumes
    old = {**ident, "input": url}                                          # a run.json of the code before
    run_record._check_identity(cfg, {"config": old}, ident, {"shard-00000"})


def test_retry_errors_reruns_only_the_shards_with_error_rows(ray_local, tiny_model, tmp_path):
    """A corrupt file is an error row for good, until --retry-errors: once it is replaced, that shard (only)
    runs again and the row is segmented; the shard without errors is kept as it was. A row that was ok and
    now fails loses its mask."""
    from PIL import Image

    from pipeline import sources
    from pipeline.job import run

    inputs = tmp_path / "in"
    paths = sorted(write_images(inputs, 4, seed=11))                 # shard 2: b/img000.png, b/img002.jpg
    paths[-1].write_bytes(b"not an image")
    out = tmp_path / "out"
    cfg = dict(input=str(inputs), output=str(out), shard_size=2, save_masks=True)
    first = run(pipeline_job_config(tiny_model, **cfg))
    assert first["error"] == 1
    kept = (out / "predictions" / "shard-00000.parquet").stat().st_mtime_ns
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(paths[-1], format="JPEG")
    again = run(pipeline_job_config(tiny_model, **cfg))              # a plain resume: nothing to do
    assert again["shards_committed_this_run"] == 0 and again["output"]["error"] == 1
    mask = out / "masks" / f"{sources.image_id(str(paths[-2]), str(inputs))}.png"
    assert mask.exists()
    paths[-2].write_bytes(b"broken since")                           # ok in the first run, an error now
    retried = run(pipeline_job_config(tiny_model, retry_errors=True, **cfg))
    assert retried["shards_retried_for_errors"] == ["shard-00001"] and retried["shards_committed_this_run"] == 1
    assert retried["output"] == {"images": 4, "ok": 3, "error": 1}
    assert (out / "predictions" / "shard-00000.parquet").stat().st_mtime_ns == kept
    t = read_predictions(str(out))
    status = dict(zip(t.column("image_uri").to_pylist(), t.column("status").to_pylist()))
    assert t.num_rows == 4 and status[str(paths[-1])] == "ok" and status[str(paths[-2])] == "error"
    assert not mask.exists() and len(list((out / "masks").iterdir())) == 3
