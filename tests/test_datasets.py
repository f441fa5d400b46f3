"""Labelled-data readers on the real mini datasets (VOC, ADE20K, CamVid) and synthetic layouts."""
from __future__ import annotations

import io
import os
import posixpath
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import (coco_object_from_stuff, image_stem, open_labelled_source,
                               reduce_zero_label)
from shared_data import shared_data_dir

CAMVID = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
          "Pedestrian", "Bicyclist"]


def _standard_layout(tmp_path: Path, data: Path) -> Path:
    """tmp/data/VOCdevkit/VOC2012 -> voc2012-mini, tmp/data/ADEChallengeData2016 -> ade20k-mini."""
    root = tmp_path / "data"
    (root / "VOCdevkit").mkdir(parents=True)
    os.symlink(data / "voc2012-mini", root / "VOCdevkit" / "VOC2012")
    os.symlink(data / "ade20k-mini", root / "ADEChallengeData2016")
    return root


def test_voc21_pairs_and_known_pixels():
    data = shared_data_dir()
    src = open_labelled_source("voc21", data_root=str(data / "voc2012-mini"))
    assert src.num_classes == 21 and src.ignore_index == 255
    assert len(src.pairs) == 18
    for img, lab in src.pairs:
        assert Path(img).is_file() and Path(lab).is_file()
        assert image_stem(img) == image_stem(lab)
    assert src.class_names[:2] == ["background", "aeroplane"]
    lab_uri = dict(src.pairs)[str(data / "voc2012-mini/JPEGImages/2007_000033_crop513.jpg")]
    lab = src.read_label(lab_uri)
    assert lab.dtype == np.int64 and lab.shape == (513, 513)
    # palette indices, not colours: (261, 19) is aeroplane (1), (222, 361) background, (285, 476) border
    assert lab[261, 19] == 1 and lab[222, 361] == 0 and lab[285, 476] == 255
    assert (lab == 1).sum() == 51198 and (lab == 255).sum() == 11058
    assert set(np.unique(lab)) == {0, 1, 255}


def test_voc20_reduces_zero_label():
    data = shared_data_dir()
    src = open_labelled_source("voc20", data_root=str(data / "voc2012-mini"))
    assert src.num_classes == 20 and src.class_names[0] == "aeroplane"
    lab = src.read_label(str(data / "voc2012-mini/SegmentationClass/2007_000033_crop513.png"))
    assert lab[261, 19] == 0          # aeroplane: 1 -> 0
    assert lab[222, 361] == 255       # background: 0 -> ignored
    assert lab[285, 476] == 255       # border stays ignored
    assert (lab == 255).sum() == 200913 + 11058


def test_standard_data_root_layout_and_limit(tmp_path):
    data = shared_data_dir()
    root = _standard_layout(tmp_path, data)
    voc = open_labelled_source("voc21", data_root=str(root))
    assert len(voc.pairs) == 18
    assert voc.image_ids == [ln.strip() for ln in
                             (data / "voc2012-mini/ImageSets/Segmentation/val.txt").read_text().split()]
    assert len(open_labelled_source("voc21", data_root=str(root), limit=5).pairs) == 5
    ade = open_labelled_source("ade20k", data_root=str(root))
    assert len(ade.pairs) == 6 and ade.num_classes == 150
    with pytest.raises(FileNotFoundError, match="context60: no prepared dataset .* one dataset's own folder"):
        open_labelled_source("context60", data_root=str(root))
    with pytest.raises(FileNotFoundError, match=r"voc21: the data root .*nowhere' is not a folder \(--data-root\)"):
        open_labelled_source("voc21", data_root=str(tmp_path / "nowhere"))


def test_image_ids_do_not_depend_on_how_the_data_root_is_spelled(tmp_path):
    root = _standard_layout(tmp_path, shared_data_dir())
    a = open_labelled_source("voc21", data_root=str(root), limit=3)
    b = open_labelled_source("voc21", data_root=str(root / "VOCdevkit" / "VOC2012"), limit=3)
    assert a.root == b.root == str(root / "VOCdevkit" / "VOC2012") and a.pairs == b.pairs


def test_ade20k_reduce_zero_label_known_pixels():
    data = shared_data_dir()
    src = open_labelled_source("ade20k", data_root=str(data / "ade20k-mini"))
    assert [image_stem(i) for i, _ in src.pairs] == [image_stem(l) for _, l in src.pairs]
    assert src.class_names[0] == "wall" and src.class_names[17] == "plant"
    lab = src.read_label(str(data / "ade20k-mini/annotations/validation/ADE_val_00000001.png"))
    assert lab.shape == (512, 683)
    assert lab[386, 344] == 255       # raw 0 "other" -> ignored
    assert lab[407, 141] == 0         # raw 1 wall -> 0
    assert lab[402, 576] == 17        # raw 18 plant -> 17
    assert (lab == 255).sum() == 3613 and (lab == 2).sum() == 134492


def test_custom_labels_camvid():
    data = shared_data_dir()
    images = sorted(str(p) for p in (data / "camvid-val/val").glob("*.png"))
    src = open_labelled_source(labels=str(data / "camvid-val/valannot"), image_uris=images,
                               class_names=CAMVID, ignore_index=11)
    assert len(src.pairs) == 101 and src.num_classes == 11 and src.ignore_index == 11
    assert all(image_stem(i) == image_stem(l) for i, l in src.pairs)
    lab = src.read_label(str(data / "camvid-val/valannot/0016E5_07959.png"))
    assert lab[48, 255] == 0 and lab[300, 415] == 3 and lab[209, 364] == 8 and lab[179, 294] == 11
    # with the default ignore index 255 the unlabelled value 11 is out of the class range
    strict = open_labelled_source(labels=str(data / "camvid-val/valannot"), image_uris=images,
                                  class_names=CAMVID)
    with pytest.raises(ValueError, match="outside"):
        strict.read_label(str(data / "camvid-val/valannot/0016E5_07959.png"))


def test_custom_labels_missing_label_raises(tmp_path):
    data = shared_data_dir()
    images = sorted(str(p) for p in (data / "camvid-val/val").glob("*.png"))[:3]
    labels = tmp_path / "labels"
    labels.mkdir()
    for img in images[:2]:
        os.symlink(data / "camvid-val/valannot" / Path(img).name, labels / Path(img).name)
    with pytest.raises(FileNotFoundError, match="1 of 3 images have no label"):
        open_labelled_source(labels=str(labels), image_uris=images, class_names=CAMVID)


def test_custom_labels_pair_nested_images_by_folder_never_by_a_shared_stem(tmp_path):
    """img/a/0.jpg and img/b/0.jpg share the stem "0": mirrored labels pair each with its own file; a
    single lbl/0.png can't tell them apart and is refused, where it used to score both against it.
    A flat label folder still serves nested images whose stems are distinct."""
    from PIL import Image

    def png(path, value):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)
    images = [tmp_path / "img" / "a" / "0.jpg", tmp_path / "img" / "b" / "0.jpg", tmp_path / "img" / "b" / "1.jpg"]
    uris = [str(p) for p in images]
    png(tmp_path / "mirrored" / "a" / "0.png", 1)
    png(tmp_path / "mirrored" / "b" / "0.png", 2)
    png(tmp_path / "mirrored" / "1.png", 0)                     # not mirrored, but its stem is unique
    src = open_labelled_source(labels=str(tmp_path / "mirrored"), image_uris=uris, class_names=["x", "y", "z"],
                               image_root=str(tmp_path / "img"))
    assert dict(src.pairs) == {uris[0]: str(tmp_path / "mirrored" / "a" / "0.png"),
                               uris[1]: str(tmp_path / "mirrored" / "b" / "0.png"),
                               uris[2]: str(tmp_path / "mirrored" / "1.png")}
    png(tmp_path / "flat" / "0.png", 1)
    png(tmp_path / "flat" / "1.png", 0)
    with pytest.raises(ValueError, match=r"2 images can't be paired .*no .*flat/a/0.png, and stem '0' is shared by 2 images"):
        open_labelled_source(labels=str(tmp_path / "flat"), image_uris=uris, class_names=["x", "y"],
                             image_root=str(tmp_path / "img"))
    src = open_labelled_source(labels=str(tmp_path / "flat"), image_uris=uris[1:], class_names=["x", "y"],
                               image_root=str(tmp_path / "img"))
    assert [posixpath.basename(lab) for _, lab in src.pairs] == ["0.png", "1.png"]
    twin = tmp_path / "img" / "a" / "0.png"                    # a/0.jpg and a/0.png: one mirrored label, two images
    with pytest.raises(ValueError, match=r"2 images can't be paired .*2 images are 'a/0' with another extension"):
        open_labelled_source(labels=str(tmp_path / "mirrored"), image_uris=uris + [str(twin)],
                             class_names=["x", "y", "z"], image_root=str(tmp_path / "img"))


def test_voc_missing_label_raises(tmp_path):
    data = shared_data_dir()
    voc = tmp_path / "VOC2012"
    (voc / "SegmentationClass").mkdir(parents=True)
    os.symlink(data / "voc2012-mini/JPEGImages", voc / "JPEGImages")
    os.symlink(data / "voc2012-mini/ImageSets", voc / "ImageSets")
    for p in sorted((data / "voc2012-mini/SegmentationClass").glob("*.png"))[1:]:
        os.symlink(p, voc / "SegmentationClass" / p.name)
    with pytest.raises(FileNotFoundError, match="1 images have no label"):
        open_labelled_source("voc21", data_root=str(voc))


def test_object_storage_root():
    """A data root on fsspec storage (memory://) is read through the same reader."""
    data = shared_data_dir()
    fs = fsspec.filesystem("memory")
    for p in (data / "ade20k-mini").rglob("*"):
        if p.is_file():
            fs.pipe_file(f"/bucket/data/ADEChallengeData2016/{p.relative_to(data / 'ade20k-mini')}",
                         p.read_bytes())
    try:
        src = open_labelled_source("ade20k", data_root="memory://bucket/data")
        assert len(src.pairs) == 6
        assert all(i.startswith("memory://") and l.startswith("memory://") for i, l in src.pairs)
        lab = src.read_label(src.pairs[0][1])
        assert lab[407, 141] == 0
    finally:
        fs.rm("/bucket", recursive=True)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _coco_layout(tmp_path: Path, raw: np.ndarray) -> Path:
    coco = tmp_path / "data" / "coco_stuff164k"
    for d in ("images/val2017", "annotations/val2017"):
        (coco / d).mkdir(parents=True)
    for name in ("000000000139", "000000000285"):
        Image.new("RGB", (3, 2)).save(coco / "images/val2017" / f"{name}.jpg")
        (coco / "annotations/val2017" / f"{name}_labelTrainIds.png").write_bytes(_png(raw))
    return tmp_path / "data"


COCO_RAW = np.array([[0, 79, 80], [170, 255, 5]], dtype=np.uint8)


def test_coco_stuff_layout(tmp_path):
    """Synthetic prepared COCO-Stuff164k layout: trainIds read as they are."""
    stuff = open_labelled_source("coco_stuff164k", data_root=str(_coco_layout(tmp_path, COCO_RAW)))
    assert stuff.num_classes == 171 and len(stuff.pairs) == 2
    assert stuff.image_ids == ["000000000139", "000000000285"]
    np.testing.assert_array_equal(stuff.read_label(stuff.pairs[1][1]), COCO_RAW)


def test_coco_object_layout(tmp_path):
    """COCO-Object from the same files: things +1, stuff -> background 0, 255 stays."""
    obj = open_labelled_source("coco_object", data_root=str(_coco_layout(tmp_path, COCO_RAW)))
    assert obj.num_classes == 81 and len(obj.pairs) == 2
    assert obj.class_names[:2] == ["background", "person"]
    np.testing.assert_array_equal(obj.read_label(obj.pairs[0][1]), [[1, 80, 0], [0, 255, 6]])


def test_cityscapes_layout(tmp_path):
    """Synthetic Cityscapes layout: per-city folders, _leftImg8bit / _gtFine_labelTrainIds pairing."""
    city = tmp_path / "data" / "cityscapes"
    for c in ("frankfurt", "lindau"):
        (city / "leftImg8bit/val" / c).mkdir(parents=True)
        (city / "gtFine/val" / c).mkdir(parents=True)
        Image.new("RGB", (3, 2)).save(city / "leftImg8bit/val" / c / f"{c}_000000_000019_leftImg8bit.png")
        (city / "gtFine/val" / c / f"{c}_000000_000019_gtFine_labelTrainIds.png").write_bytes(
            _png(np.array([[0, 18, 255], [1, 2, 3]])))
    cs = open_labelled_source("cityscapes", data_root=str(tmp_path / "data"))
    assert cs.num_classes == 19
    assert cs.image_ids == ["frankfurt_000000_000019", "lindau_000000_000019"]
    assert cs.pairs[1][1].endswith("gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png")
    np.testing.assert_array_equal(cs.read_label(cs.pairs[0][1]), [[0, 18, 255], [1, 2, 3]])


def test_label_transforms_unit():
    raw = np.array([0, 1, 2, 150, 255])
    np.testing.assert_array_equal(reduce_zero_label(raw), [255, 0, 1, 149, 255])
    np.testing.assert_array_equal(coco_object_from_stuff(np.array([0, 79, 80, 170, 255])),
                                  [1, 80, 0, 0, 255])
    with pytest.raises(ValueError):
        coco_object_from_stuff(np.array([171]))


def test_nested_symlinked_folders_are_listed(tmp_path):
    """Image and label folders linked inside a benchmark's folders are listed, as the job's --input lists them."""
    data = shared_data_dir()
    ade = tmp_path / "ADEChallengeData2016"
    for sub in ("images", "annotations"):
        (ade / sub).mkdir(parents=True)
        os.symlink(data / "ade20k-mini" / sub / "validation", ade / sub / "validation")
    assert len(open_labelled_source("ade20k", data_root=str(tmp_path)).pairs) == 6
    # one level deeper: the split's folder is real, the files sit in a linked folder inside it
    nested = tmp_path / "nested" / "ADEChallengeData2016"
    for sub in ("images", "annotations"):
        (nested / sub / "validation").mkdir(parents=True)
        os.symlink(data / "ade20k-mini" / sub / "validation", nested / sub / "validation" / "part1")
    src = open_labelled_source("ade20k", data_root=str(tmp_path / "nested"))
    assert len(src.pairs) == 6
    assert all("/validation/part1/" in i and "/validation/part1/" in l for i, l in src.pairs)


def test_an_ignore_index_that_is_also_a_class_is_refused():
    """With 300 classes the default ignore index 255 is a class: its pixels would never be scored."""
    from pipeline.datasets import LabelledSource

    names = [f"c{i}" for i in range(300)]
    with pytest.raises(ValueError, match=r"ignore index 255 is also class 255 \('c255'\).*--ignore-index"):
        LabelledSource("custom", [], names, 255)
    assert LabelledSource("custom", [], names, 65535).num_classes == 300


def test_limit_checks_only_the_images_it_takes(tmp_path):
    """A --limit run is not stopped by a missing label past the limit; a flat label folder pairs a --limit
    run as the full run does (a stem shared with an image past the limit is still ambiguous)."""
    import shutil

    data = shared_data_dir() / "voc2012-mini"
    copy = tmp_path / "voc"
    shutil.copytree(data, copy)
    last = (copy / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[-1]
    (copy / "SegmentationClass" / f"{last}.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 images have no label file"):
        open_labelled_source("voc21", data_root=str(copy))
    assert len(open_labelled_source("voc21", data_root=str(copy), limit=3).pairs) == 3

    images, labels = tmp_path / "img", tmp_path / "lab"
    for sub in ("a", "b"):
        (images / sub).mkdir(parents=True)
    labels.mkdir()
    for rel in ("a/x.jpg", "a/y.jpg", "b/x.jpg", "b/z.jpg"):
        (images / rel).write_bytes(b"")
    for stem in ("x", "y"):                                          # flat labels; none for z
        (labels / f"{stem}.png").write_bytes(b"")
    uris = sorted(str(p) for p in images.rglob("*.jpg"))             # a/x, a/y, b/x, b/z
    kw = dict(labels=str(labels), class_names=["a", "b"], image_root=str(images))
    src = open_labelled_source(image_uris=uris[1:], limit=1, **kw)   # a/y alone: its label is y.png
    assert [posixpath.basename(l) for _, l in src.pairs] == ["y.png"]
    with pytest.raises(ValueError, match="can't be paired"):         # a/x: x.png could be b/x's too
        open_labelled_source(image_uris=uris, limit=1, **kw)
    with pytest.raises(FileNotFoundError, match="have no label"):    # b/z, within the limit
        open_labelled_source(image_uris=uris[1:2] + uris[3:], limit=2, **kw)
