"""The comparison table, the published numbers, and jobs/evaluate.py end to end on real VOC / ADE files."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.comparison import build_comparison, comparison_markdown
from pipeline.published import PUBLISHED, TABLE_ORDER, published
from _direct_metrics import direct_scores
from shared_data import shared_data_dir

REPO = Path(__file__).resolve().parents[1]


def test_published_table_is_consistent():
    assert set(PUBLISHED) == {"CLIP", "MaskCLIP", "SCLIP", "ClearCLIP", "NACLIP", "RF-CLIP", "RF-CLIP + PAMR"}
    for row, vals in PUBLISHED.items():
        assert abs(np.mean([vals[b] for b in TABLE_ORDER]) - vals["avg"]) <= 0.1, row
    assert published("rfclip", "voc21") == 64.8 and published("clearclip", "ade20k") == 16.7
    assert published("rfclip", "voc21", pamr=True) == 67.2 and published("unknown", "voc21") is None


def test_comparison_table_layout():
    results = {("voc21", "rfclip"): {"mIoU": 10.0, "images": 5},
               ("ade20k", "rfclip"): {"mIoU": 20.0, "images": 2000},
               ("voc21", "clearclip"): {"mIoU": 30.0, "images": 5}}
    t = build_comparison(results, ["ade20k", "voc21"], ["rfclip", "clearclip"],
                         {"voc21": 1449, "ade20k": 2000})
    assert t["benchmarks"] == ["voc21", "ade20k"]  # table order, not argument order
    rf, cc = t["rows"]
    assert rf["avg"]["mIoU"] == 15.0 and rf["avg"]["published"] == pytest.approx((64.8 + 20.4) / 2)
    assert rf["avg"]["published_avg_all"] == 44.2
    assert cc["avg"]["mIoU"] is None  # ade20k missing: no average over a partial row
    md = comparison_markdown(t)
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| method | VOC21 | ADE | avg |"
    assert lines[1] == "| rfclip | **10.0** (64.8) n=5/1449 | **20.0** (20.4) n=2000 | **15.0** (42.6) |"
    assert lines[2].startswith("| clearclip | **30.0** (51.8) n=5/1449 | – (16.7) |")
    rf["cells"]["voc21"]["failed_images"] = 2                # an evaluation with unreadable images says so
    assert "n=5/1449 (2 failed)" in comparison_markdown(t)
    pamr = build_comparison(results, ["voc21"], ["rfclip"], pamr=True)
    assert pamr["rows"][0]["cells"]["voc21"]["published"] == 67.2


@pytest.mark.timeout(600)
def test_evaluate_end_to_end(tmp_path, ray_local, tiny_model, capsys):
    """voc20 + ade20k x clip + clearclip, random tiny model, 2 real images each: mechanics only.

    Checks: counts, per-pair metrics.json equal a direct NumPy mIoU from the stored predictions
    (mask_png) and the real label files, report written, comparison table filled."""
    data = shared_data_dir()
    import pyarrow.parquet as pq
    from pipeline.datasets import open_labelled_source
    from rfclip.visualize import decode_label_png

    root = tmp_path / "data"
    (root / "VOCdevkit").mkdir(parents=True)
    os.symlink(data / "voc2012-mini", root / "VOCdevkit" / "VOC2012")
    os.symlink(data / "ade20k-mini", root / "ADEChallengeData2016")
    cfg, weights = tiny_model
    out = tmp_path / "eval"
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import evaluate
    finally:
        sys.path.remove(str(REPO / "jobs"))
    rc = evaluate.main(["--data-root", str(root), "--benchmarks", "ade20k,voc20",
                        "--methods", "clip,clearclip", "--limit", "2", "--model", str(cfg),
                        "--weights", str(weights), "--output", str(out), "--shard-size", "1"])
    assert rc == 0
    table = json.loads((out / "comparison.json").read_text())
    assert table["benchmarks"] == ["voc20", "ade20k"] and table["methods"] == ["clip", "clearclip"]
    for row in table["rows"]:
        for b, cell in row["cells"].items():
            run = out / b / row["method"]
            m = json.loads((run / "metrics.json").read_text())
            assert cell["images"] == m["images"] == 2 and m["images_failed"] == 0 and cell["failed_images"] == 0
            assert len(m["classes"]) == {"voc20": 20, "ade20k": 150}[b]
            src = open_labelled_source(b, data_root=str(root), limit=2)
            rows = pq.read_table(run / "predictions").to_pylist()
            assert sorted(r["image_uri"] for r in rows) == sorted(i for i, _ in src.pairs)
            maps = [(decode_label_png(r["mask_png"]), src.read_label(dict(src.pairs)[r["image_uri"]])) for r in rows]
            direct = direct_scores(maps, src.num_classes)[2]
            assert m["mIoU"] == pytest.approx(direct, rel=1e-9) and cell["mIoU"] == m["mIoU"]
            text = (run / "report.md").read_text()
            assert "figures/confusion.png" in text and (run / "figures/samples.png").is_file()
    md = (out / "comparison.md").read_text()
    assert re.search(r"\| clip \| \*\*[0-9.]+\*\* \(49\.1\) n=2/1449 \| \*\*[0-9.]+\*\* \(3\.2\) n=2/2000 \|", md)
    # Another --limit into the same output is a refusal: said in one line, naming the cause, no traceback.
    # Where every pair is refused, the earlier comparison stays as it was.
    capsys.readouterr()
    before = {n: (out / n).read_bytes() for n in ("comparison.md", "comparison.json")}
    again = ["--data-root", str(root), "--benchmarks", "voc20", "--limit", "3", "--model", str(cfg),
             "--weights", str(weights), "--output", str(out), "--shard-size", "1"]
    rc = evaluate.main(again + ["--methods", "clip"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "another --limit" in err and "failed: ConfigMismatch:" in err
    assert "earlier comparison.md and comparison.json" in err
    assert {n: (out / n).read_bytes() for n in before} == before
    # Where another pair runs, the table marks the refused one failed and points at the metrics it left.
    rc = evaluate.main(again + ["--methods", "clip,maskclip"])
    md = (out / "comparison.md").read_text()
    assert rc == 1 and "| clip | failed (49.1) |" in md
    assert "\n  (an earlier run's metrics are kept in voc20/clip/metrics.md)" in md


@pytest.mark.parametrize("how", ["@file", "env"])
def test_evaluate_storage_options_from_a_file_or_the_environment_and_secrets_scrubbed(how, tmp_path, monkeypatch,
                                                                                       capsys):
    """--storage-options @file and $RFCLIP_STORAGE_OPTIONS work as in the segmentation job, and a secret
    from them that turns up in an error (here: no dataset under the root, found before any pair runs) is
    scrubbed."""
    from jobs.evaluate import main

    secret = "s3cr3t-value-42"
    opts = tmp_path / "so.json"
    opts.write_text(json.dumps({"secret": secret}))
    args = ["--data-root", f"memory://{secret}/nothing-here", "--benchmarks", "voc20", "--methods", "clip",
            "--output", str(tmp_path / "eval")]
    if how == "@file":
        args += ["--storage-options", f"@{opts}"]
    else:
        monkeypatch.setenv("RFCLIP_STORAGE_OPTIONS", f"@{opts}")
    assert main(args) == 2                                               # no such data: nothing runs
    err = capsys.readouterr().err
    assert "error: voc20: the data root" in err and "***" in err and secret not in err
    assert "Traceback" not in err and not (tmp_path / "eval").exists()


def test_evaluate_refuses_unknown_methods_before_running_anything(tmp_path, capsys):
    from jobs.evaluate import main

    with pytest.raises(SystemExit) as e:
        main(["--data-root", "x", "--benchmarks", "voc20", "--methods", "clip,foo", "--output", str(tmp_path / "o")])
    assert e.value.code == 2 and "unknown methods ['foo']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluate_refuses_unreadable_storage_options(tmp_path, capsys):
    from jobs.evaluate import main

    rc = main(["--data-root", "x", "--benchmarks", "voc20", "--methods", "clip", "--output", str(tmp_path),
               "--storage-options", "{not json"])
    assert rc == 2 and "error: --storage-options" in capsys.readouterr().err


def _voc_root(tmp_path):
    root = tmp_path / "data"
    (root / "VOCdevkit").mkdir(parents=True)
    os.symlink(shared_data_dir() / "voc2012-mini", root / "VOCdevkit" / "VOC2012")
    return root


def test_the_comparison_names_a_weights_url_without_its_credentials(tmp_path, monkeypatch):
    import fsspec

    from jobs import evaluate

    url = "https://user:hunter2secret@example.com/w.pt?X-Amz-Signature=abcdef123456"
    monkeypatch.setattr(evaluate, "evaluate_pair", lambda *a: {"mIoU": 10.0, "images": 1})
    args = evaluate.parse_args(["--data-root", str(tmp_path), "--benchmarks", "voc21", "--methods", "clip",
                                "--output", str(tmp_path / "eval"), "--weights", url])
    (tmp_path / "eval").mkdir()
    status, md = evaluate._evaluate_all(args, {}, fsspec.filesystem("file"), str(tmp_path / "eval"))
    written = (tmp_path / "eval" / "comparison.md").read_text() + (tmp_path / "eval" / "comparison.json").read_text()
    assert status == 0 and "https://***@example.com/w.pt?***" in md
    assert "hunter2secret" not in md + written and "abcdef123456" not in md + written
    assert "--setting" not in md
    args.settings = {"prob_thd": 0.3}                     # settings over the presets: said under the table
    assert "over each benchmark's preset: prob_thd=0.3" in evaluate._evaluate_all(
        args, {}, fsspec.filesystem("file"), str(tmp_path / "eval"))[1]
    args.settings = {"plan": "explicit", "lam": 0.5}       # how it runs, and what clip does not use: not said
    assert "--setting" not in evaluate._evaluate_all(args, {}, fsspec.filesystem("file"), str(tmp_path / "eval"))[1]


def test_evaluate_checks_the_weights_and_the_output_once_before_any_pair(tiny_model, tmp_path, monkeypatch,
                                                                          capsys):
    """Weights it can't get, or an output it can't write, are one error line and exit 2 before any pair
    runs: not one failure per pair, a traceback, or a table of failed cells."""
    from jobs import evaluate

    ran = []
    monkeypatch.setattr(evaluate, "evaluate_pair", lambda *a: ran.append(a))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")           # deterministic with or without a network
    base = ["--data-root", str(_voc_root(tmp_path)), "--benchmarks", "voc20,voc21", "--methods", "clip,maskclip",
            "--limit", "1"]
    assert evaluate.main(base + ["--output", str(tmp_path / "e1")]) == 2          # default weights: 'openai'
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--weights PATH" in err and "rfclip.random_model" in err
    assert "Traceback" not in err and not (tmp_path / "e1").exists()
    cfg, weights = tiny_model
    (tmp_path / "a-file").write_text("not a folder")
    model = ["--model", str(cfg), "--weights", str(weights)]
    assert evaluate.main(base + model + ["--output", str(tmp_path / "a-file" / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "is not writable" in err and "Traceback" not in err
    assert not ran


def test_evaluate_ctrl_c_says_how_to_finish(tiny_model, tmp_path, monkeypatch, capsys):
    """Ctrl-C during a pair: exit status 130 and one line that says the committed shards are kept and how to
    finish the rest (with --overwrite: not by running it again as it was); no traceback, and no empty
    output folder left. A cluster that can't be reached is one error line before any pair runs."""
    from jobs import evaluate

    def interrupt(*args):
        raise KeyboardInterrupt

    def no_cluster(address):
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(evaluate, "evaluate_pair", interrupt)
    monkeypatch.setattr(evaluate.cluster, "init_ray", lambda address: False)      # no Ray needed
    cfg, weights = tiny_model
    args = ["--data-root", str(_voc_root(tmp_path)), "--benchmarks", "voc20", "--methods", "clip",
            "--model", str(cfg), "--weights", str(weights), "--output", str(tmp_path / "eval")]
    assert evaluate.main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted: the shards committed so far are kept; run the same command again" in err
    assert "Traceback" not in err and not (tmp_path / "eval").exists()
    assert evaluate.main(args + ["--overwrite"]) == 130
    assert "run the command again without --overwrite" in capsys.readouterr().err
    monkeypatch.setattr(evaluate.cluster, "init_ray", no_cluster)
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "error: Could not find any running Ray instance" and err.count("error:") == 1
    assert "Traceback" not in err and not (tmp_path / "eval").exists()
