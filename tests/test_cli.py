"""The person-facing tools: ``python -m rfclip.segment`` and ``python -m rfclip.find_distraction_dims``."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from rfclip.visualize import decode_label_png, label_png

from _tiny import planted_files, planted_image  # noqa: F401


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_segment_writes_label_pngs_and_overlays(tiny_model, tmp_path):
    cfg, weights = tiny_model
    paths = []
    for i, shape in enumerate([(120, 200), (90, 60)]):
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray(planted_image(*shape, seed=i)).save(p)
        paths.append(str(p))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    big = tmp_path / "big.png"
    Image.new("L", (3000, 2000)).save(big)                  # 6 MP: over --max-pixels (Pillow's own bomb error
    r = run("rfclip.segment", str(bad), str(big), *paths,   # is no OSError, and it once ended the run here)
            "--vocabulary", "sky, cloud; road; car", "--model", cfg, "--max-pixels", "5000000",
            "--weights", weights, "--out", str(tmp_path / "out"), "--overlay", "--method", "clearclip")
    assert r.returncode == 1, r.stderr                      # unreadable inputs reported, the others written
    assert "broken.jpg: cannot read image: not an image" in r.stderr
    assert "big.png: cannot read image: image too large: 3000x2000" in r.stderr
    for i, shape in enumerate([(120, 200), (90, 60)]):
        labels = decode_label_png((tmp_path / "out" / f"img{i}.png").read_bytes())
        assert labels.shape == shape and labels.max() < 3
        with Image.open(tmp_path / "out" / f"img{i}_overlay.png") as ov:
            assert ov.size[1] >= shape[0] and ov.size[0] > shape[1]   # the legend widens the image


def test_find_distraction_dims_recovers_planted_channels(planted_files, tmp_path):
    cfg, weights = planted_files
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i, shape in enumerate([(200, 260), (224, 224), (150, 330), (300, 200)]):   # sizes differ, as real folders
        Image.fromarray((rng.random((*shape, 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    r = run("rfclip.find_distraction_dims", "--model", cfg, "--weights", weights, "--images", str(tmp_path / "imgs"),
            "--top", "8", "--z-threshold", "1.85", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["images"] == 4 and "broken.png: skipped, cannot read image" in r.stderr
    assert sorted(row["dim"] for row in out["top"]) == list(range(8))
    assert out["distraction_dims"] == list(range(8))          # z 2.0-5.1; the next channel has 1.7


def test_find_distraction_dims_reports_every_peak_whatever_top_lists():
    """``--top`` sets the rows listed, not the peaks: a peak below the listed rows is still reported."""
    import torch

    from rfclip.find_distraction_dims import peak_dimensions

    weights = torch.full((64,), 0.01) + torch.linspace(0, 1e-4, 64)
    weights[[3, 9, 20, 40, 41]] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    rows, peaks = peak_dimensions(weights, top=3, z_threshold=8.0)
    assert [r["dim"] for r in rows] == [3, 9, 20] and all(r["peak"] for r in rows)
    assert peaks == [3, 9, 20, 40, 41]


def test_offline_default_weights_fail_fast_with_a_message(tmp_path):
    import time

    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray(planted_image(64, 64)).save(img)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "rfclip.segment", str(img), "--vocabulary", "sky; road",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "weights=PATH" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60


def test_segment_keeps_outputs_of_same_stem_images_apart(tiny_model, tmp_path):
    from rfclip.segment import main

    cfg, weights = tiny_model
    (tmp_path / "in" / "sub").mkdir(parents=True)
    paths = [tmp_path / "in" / "a.jpg", tmp_path / "in" / "a.png", tmp_path / "in" / "sub" / "a.png"]
    for i, p in enumerate(paths):
        Image.fromarray(planted_image(40 + 10 * i, 50, seed=i)).save(p)
    out = tmp_path / "out"
    assert main([*map(str, paths), "--vocabulary", "sky; road", "--model", cfg, "--weights", weights,
                 "--out", str(out), "--method", "clip"]) == 0
    for p, name in zip(paths, ["a.jpg.png", "a.png.png", "sub/a.png.png"]):
        with Image.open(p) as im, Image.open(out / name) as mask:
            assert mask.size == im.size                         # each output is its own image's


def test_segment_takes_a_folder_as_the_images_below_it(tiny_model, tmp_path, capsys):
    from rfclip.segment import main

    cfg, weights = tiny_model
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for i, rel in enumerate(["b.png", "sub/c.jpg"]):
        Image.fromarray(planted_image(40, 50, seed=i)).save(tmp_path / "in" / rel)
    (tmp_path / "in" / "notes.txt").write_text("not an image")             # not an image suffix: not listed
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    common = ["--vocabulary", "sky; road", "--model", cfg, "--weights", weights, "--out", str(out), "--method", "clip"]
    assert main([str(tmp_path / "in"), str(tmp_path / "empty")] + common) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["b.png", "c.png"]
    assert "empty: no images in this folder" in captured.err and "class" in captured.out
    assert main([str(tmp_path / "empty")] + common) == 2
    assert "no images to segment" in capsys.readouterr().err


def test_segment_never_overwrites_or_rereads_its_inputs(tiny_model, tmp_path, capsys):
    import hashlib
    import os

    from rfclip.segment import image_files, main

    cfg, weights = tiny_model
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png"]):
        Image.fromarray(planted_image(40, 50, seed=i)).save(photos / name)
    os.symlink("..", photos / "sub" / "up")                              # a cycle: photos/sub/up -> photos
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.glob("*.png")}
    common = ["--vocabulary", "sky; road", "--model", cfg, "--weights", weights, "--method", "clip", "--overlay"]

    assert main([str(photos), "--out", str(photos)] + common) == 2       # the output is the input folder
    assert "is --out" in capsys.readouterr().err
    assert main([str(photos / "a.png"), "--out", str(photos)] + common) == 2   # a.png -> photos/a.png
    assert "would overwrite the input" in capsys.readouterr().err
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.glob("*.png")} == digest

    masks = photos / "masks"                                             # the output inside the input folder
    for _ in range(2):                                                   # the second run reads no mask as an image
        assert main([str(photos), str(photos / "a.png"), "--out", str(masks)] + common) == 0
        printed = capsys.readouterr().out
        assert printed.count(" -> ") == 2, printed                       # a.png once: the cycle and the repeat
        assert sorted(p.name for p in masks.iterdir()) == ["a.png", "a_overlay.png", "b.png", "b_overlay.png"]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.glob("*.png")} == digest
    assert [os.path.basename(p) for p in image_files([str(photos)], str(masks))] == ["a.png", "b.png"]

    (photos / "sub" / "top").symlink_to("/")                             # links to above the input: not walked
    (photos / "sub" / "inner").symlink_to(photos / "sub")                # a link inside it: listed by its own path
    assert [os.path.relpath(p, photos) for p in image_files([str(photos)], str(masks))] == ["a.png", "b.png"]
    data = tmp_path / "data"                                             # --out holding the input folders:
    for sub in ("images", "other"):                                      # fine, unless an output lands in one
        (data / sub).mkdir(parents=True)
        Image.fromarray(planted_image(40, 50, seed=3)).save(data / sub / "c.png")
    assert main([str(data / "images"), "--out", str(data)] + common) == 0
    assert sorted(p.name for p in data.iterdir()) == ["c.png", "c_overlay.png", "images", "other"]
    capsys.readouterr()
    assert main([str(data / "images"), str(data / "other"), "--out", str(data)] + common) == 2
    assert "would land inside the input folder" in capsys.readouterr().err    # data/images/c.png.png

    mine = tmp_path / "mine"                                             # a user's file under an output's name
    mine.mkdir()
    Image.fromarray(planted_image(40, 50, seed=5)).save(mine / "a.png")
    Image.fromarray(planted_image(40, 50, seed=6)).save(mine / "a.jpg")
    theirs = hashlib.sha256((mine / "a.png").read_bytes()).hexdigest()
    assert main([str(mine / "a.jpg"), "--out", str(mine)] + common) == 2   # a.jpg -> mine/a.png: not replaced
    assert f"already holds {mine / 'a.png'}, which rfclip-segment did not write" in capsys.readouterr().err
    assert hashlib.sha256((mine / "a.png").read_bytes()).hexdigest() == theirs
    (mine / "a.png").write_bytes(label_png(np.zeros((40, 50), int), 2))  # VOC's ground truth looks like this
    assert main([str(mine / "a.jpg"), "--out", str(mine)] + common) == 2
    assert "which rfclip-segment did not write" in capsys.readouterr().err
    (mine / "a.png").unlink()
    for _ in range(2):                                                   # its own outputs: replaced
        assert main([str(mine / "a.jpg"), "--out", str(mine)] + common) == 0
    with Image.open(mine / "a.png") as m, Image.open(mine / "a_overlay.png") as o:
        assert m.info["Software"] == o.info["Software"] == "rfclip-segment"

    gone = tmp_path / "new" / "deeper"                                   # a failed model load leaves no folder
    assert main([str(photos / "a.png"), "--out", str(gone), "--vocabulary", "sky", "--model", cfg,
                 "--weights", str(tmp_path / "missing.pt")]) == 2
    assert not (tmp_path / "new").exists()
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    assert main([str(photos / "a.png"), "--out", str(tmp_path / "dangling")] + common) == 2
    assert "is a link to nothing" in capsys.readouterr().err


def test_output_names_are_stems_unless_they_clash():
    from rfclip.segment import output_names

    assert output_names(["/p/x/street.jpg", "/p/y/park.jpg"]) == ["street", "park"]       # flat, as before
    assert output_names(["/d/a.jpg", "/d/a.png", "/d/a.jpg.png"]) == ["a.jpg", "a.png", "a.jpg.png"]
    assert output_names(["/p/x/a.jpg", "/p/y/a.jpg", "/p/x/a.jpg"]) == ["x/a.jpg", "y/a.jpg", "x/a.jpg"]
    assert output_names(["/d/a.jpg", "/d/a_overlay.jpg"], overlay=True) == ["a", "a_overlay-2"]
    many = [f"/d/{i % 7}/img{i}.jpg" for i in range(5000)]
    assert len(set(output_names(many))) == 5000


def test_tool_errors_are_one_line_not_tracebacks(tiny_model, tmp_path, capsys):
    import pytest
    import torch

    from rfclip import find_distraction_dims, segment

    cfg, weights = tiny_model
    img = tmp_path / "a.png"
    Image.fromarray(planted_image(40, 50)).save(img)
    common = [str(img), "--model", cfg, "--weights", weights, "--out", str(tmp_path / "o"), "--method", "clip"]
    cases = [(["--vocabulary-file", str(tmp_path / "missing.txt")], "vocabulary file " + str(tmp_path / "missing.txt")
              + " does not exist"),
             (["--vocabulary", " ; "], "vocabulary is empty")]
    if not torch.cuda.is_available():
        cases.append((["--vocabulary", "sky", "--device", "cuda"], "CUDA is not available"))
    (tmp_path / "afile").write_text("")
    cases.append((["--vocabulary", "sky", "--out", str(tmp_path / "afile")], "is a file, not a folder"))
    for extra, message in cases:
        assert segment.main(common + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err, err
    assert segment.main([str(tmp_path / "typo.png")] + common[1:] + ["--vocabulary", "sky"]) == 2   # before the model
    assert capsys.readouterr().err == f"error: no such file or folder: {tmp_path / 'typo.png'}\n"
    with pytest.raises(SystemExit) as e:                       # a setting of the wrong type: a usage error
        segment.main(common + ["--vocabulary", "sky", "--setting", "pamr=maybe"])
    assert e.value.code == 2 and "pamr must be true or false" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        segment.main(common + ["--vocabulary", "sky", "--image-mean", "0.5,0.5"])
    assert e.value.code == 2 and "the value must be 3 finite numbers (R, G, B), got '0.5,0.5'" in capsys.readouterr().err
    assert segment.main(common + ["--vocabulary", "sky", "--image-std", "0.5,0,0.5"]) == 2
    assert "image_std must be 3 finite numbers (R, G, B), all > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        find_distraction_dims.main(["--model", cfg, "--weights", weights, "--images", str(tmp_path), "--limit", "0"])
    assert "must be >= 1" in capsys.readouterr().err


def test_find_distraction_dims_without_peaks_says_so_and_recommends_nothing(planted_files, tmp_path, capsys):
    from rfclip.find_distraction_dims import main

    cfg, weights = planted_files
    (tmp_path / "imgs").mkdir()
    Image.fromarray(planted_image(64, 64)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    rc = main(["--model", cfg, "--weights", weights, "--images", str(tmp_path / "imgs"), "--z-threshold", "1e9"])
    captured = capsys.readouterr()
    assert rc == 1 and "no dimension peaks above robust z 1e+09" in captured.err
    assert "broken.png: skipped" in captured.err
    assert "distraction_dims=" not in captured.out                   # no '[]' to paste


def test_job_help_gives_each_flag_its_default_once(capsys):
    """The README says `--help` lists every flag with its default: no flag with a value hides it, none says
    "default: None", and none says its default twice."""
    import pytest

    from jobs import evaluate, segment_dataset

    for main in (segment_dataset.main, evaluate.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "default: None" not in text and "(default: 1000)" in text and "(default: ViT-B-16)" in text


def test_evaluate_passes_each_method_only_the_settings_it_uses():
    from jobs import evaluate

    given = {"distraction_dims": [1, 2], "lam": 0.5, "logit_scale": 40.0}
    assert evaluate._settings_for("clip", given) == {"logit_scale": 40.0}
    assert evaluate._settings_for("rfclip", given) == given
    assert evaluate._settings_for("rfclip-release", given) == {"distraction_dims": [1, 2], "logit_scale": 40.0}


def test_label_encoding_is_checked_before_any_model_work():
    from types import SimpleNamespace as N

    import pytest

    from jobs.segment_dataset import _label_transform

    def transform(benchmark, encoding, ignore=255):
        return _label_transform(N(benchmark=benchmark), N(label_encoding=encoding, ignore_index=ignore))

    assert transform("voc21", None) == transform("voc21", "benchmark") == transform(None, "indices") == "identity"
    assert transform("ade20k", "benchmark") == "reduce_zero_label" and transform("ade20k", "indices") == "identity"
    assert transform("coco_object", "benchmark") == "coco_object"
    for args, message in [(("ade20k", None), "say which your labels are"),
                          ((None, "benchmark"), "needs --benchmark NAME"),
                          (("voc21", "benchmark", 300), "does not apply"),
                          (("ade20k", "benchmark", 0), "does not apply")]:
        with pytest.raises(ValueError, match=message):
            transform(*args)


def test_segment_checks_out_is_writable_before_the_model_and_stops_at_a_failed_write(tiny_model, tmp_path, capsys,
                                                                                      monkeypatch):
    """An --out it can't write in is refused before the model loads (exit 2); a mask that can't be written
    (here a folder holds its name) stops the run with one line (exit 1), the masks before it kept; an
    image that can't be read is reported, the others segmented, and a last line counts the failures."""
    import pytest

    from rfclip import segment

    cfg, weights = tiny_model
    images = tmp_path / "in"
    images.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(planted_image(40, 50, seed=ord(name))).save(images / f"{name}.png")
    common = ["--model", cfg, "--weights", weights, "--method", "clip", "--vocabulary", "sky; road"]

    def no_write(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    out = tmp_path / "ro"
    out.mkdir()
    with monkeypatch.context() as m:
        m.setattr(segment.tempfile, "TemporaryFile", no_write)
        m.setattr(segment, "Segmenter", lambda *a, **k: pytest.fail("the model loaded"))
        assert segment.main([str(images), "--out", str(out)] + common) == 2
        assert f"--out {out}: can't write in this folder: Permission denied" in capsys.readouterr().err
        assert segment.main([str(images), "--out", str(tmp_path / "new" / "o")] + common) == 2
        assert not (tmp_path / "new").exists()                  # the folders it made are taken back
    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)                        # a folder under an output's name: not replaced
    assert segment.main([str(images), "--out", str(out)] + common) == 2
    assert f"already holds {out / 'b.png'}, which rfclip-segment did not write" in capsys.readouterr().err
    (out / "b.png").rmdir()
    write_whole = segment._write_whole

    def full_disk_at(name):
        def write(path, data):
            if path.name == name:
                raise OSError(28, "No space left on device")
            write_whole(path, data)
        return write

    with monkeypatch.context() as m:
        m.setattr(segment, "_write_whole", full_disk_at("b.png"))
        assert segment.main([str(images), "--out", str(out)] + common) == 1
        err = capsys.readouterr().err
        assert f"error: can't write {out / 'b.png'}: No space left on device" in err
        assert "the masks written so far are kept" in err
        assert (out / "a.png").is_file() and not (out / "c.png").exists()
        m.setattr(segment, "_write_whole", full_disk_at("a_overlay.png"))
        assert segment.main([str(images), "--out", str(out), "--overlay"] + common) == 1   # names the overlay
        assert f"error: can't write {out / 'a_overlay.png'}" in capsys.readouterr().err
    (images / "b.png").write_bytes(b"not a png")
    (images / "d.png").symlink_to(tmp_path / "nowhere.png")       # a broken link inside a folder: unreadable
    assert segment.main([str(images), "--out", str(out), "--setting", "lam=0.5"] + common) == 1
    err = capsys.readouterr().err
    assert "b.png: cannot read image" in err and "d.png: cannot read image" in err
    assert "2 of 4 images could not be read (reasons above)" in err
    assert not list(out.glob(".*.tmp"))
    # A warning is a line of its own, not Python's "<file>:<line>: UserWarning: ..." form.
    assert "warning: method 'clip' does not use the setting(s) ['lam']" in err and "UserWarning" not in err
    assert (out / "c.png").is_file()
