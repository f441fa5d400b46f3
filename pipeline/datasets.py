"""Readers for labelled data: the eight OVSS benchmarks and a user's own labelled corpus.

Public API (used by ``jobs/segment_dataset.py`` and ``jobs/evaluate.py``)::

    src = open_labelled_source(
        benchmark="voc21",          # one of BENCHMARK_LAYOUTS, or None for custom labels
        data_root="data/",          # MMSegmentation-style data/ folder (local path or fsspec URI),
                                    # or the dataset folder itself (e.g. .../VOCdevkit/VOC2012)
        labels=None,                # custom: folder of label PNGs, <sub>/<image stem>.png as the images lie
        image_uris=None,            # custom: the images to pair with ``labels``
        image_root=None,            # custom: the folder the images were listed from (None: a manifest)
        class_names=None,           # custom: class names in label-index order (the vocabulary)
        ignore_index=255,           # custom: the label value that is ignored
        storage_options=None,       # fsspec options for both roots
        limit=None,                 # keep the first N pairs (split-file / sorted order)
    ) -> LabelledSource

    src.pairs            # list[(image_uri, label_uri)], every image with its label
    src.root             # the data root (a benchmark's image ids are relative to it); None for custom
    src.image_ids        # list[str], the image stems, same order
    src.class_names      # list[str], label-index order
    src.num_classes      # K
    src.ignore_index     # value marking ignored pixels in decoded labels
    src.decode_label(png_bytes) -> np.ndarray  # (H, W) int64 in class-index space [0, K),
                                               # ignored pixels == src.ignore_index
    src.read_label(label_uri) -> np.ndarray    # the same, reading the file

Benchmarks decode labels as MMSegmentation does: ``reduce_zero_label`` maps 0 -> ignore (255) and
v -> v - 1; COCO-Object is derived from COCO-Stuff164k trainIds (0..79 things -> +1, 80..170 stuff
-> 0 = background, 255 stays). Anything missing (layout, split file, a label for an image) raises;
nothing is skipped silently.
"""
from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from rfclip.visualize import decode_label_png

from .sources import find_files, relative_to
from .storage import canonical_path, full_uri, get_fs, read_uris

IGNORE = 255


@dataclass(frozen=True)
class Layout:
    """Where a benchmark's val split lives inside ``data/`` and how its labels are encoded."""

    dataset_dirs: tuple[str, ...]   # candidate dataset folders relative to data/, "" = data_root itself
    marker: str                     # a folder that must exist inside the dataset folder
    image_dir: str
    label_dir: str
    image_suffix: str               # e.g. ".jpg" or "_leftImg8bit.png"
    label_suffix: str               # e.g. ".png" or "_gtFine_labelTrainIds.png"
    split_file: Optional[str]       # list of ids (VOC style) or None: list image_dir recursively
    transform: str                  # "identity" | "reduce_zero_label" | "coco_object"


_VOC12 = ("VOCdevkit/VOC2012", "VOC2012", "")
_VOC10 = ("VOCdevkit/VOC2010", "VOC2010", "")

BENCHMARK_LAYOUTS: dict[str, Layout] = {
    "voc21": Layout(_VOC12, "SegmentationClass", "JPEGImages", "SegmentationClass", ".jpg", ".png",
                    "ImageSets/Segmentation/val.txt", "identity"),
    "voc20": Layout(_VOC12, "SegmentationClass", "JPEGImages", "SegmentationClass", ".jpg", ".png",
                    "ImageSets/Segmentation/val.txt", "reduce_zero_label"),
    "context60": Layout(_VOC10, "SegmentationClassContext", "JPEGImages", "SegmentationClassContext",
                        ".jpg", ".png", "ImageSets/SegmentationContext/val.txt", "identity"),
    "context59": Layout(_VOC10, "SegmentationClassContext", "JPEGImages", "SegmentationClassContext",
                        ".jpg", ".png", "ImageSets/SegmentationContext/val.txt", "reduce_zero_label"),
    "coco_stuff164k": Layout(("coco_stuff164k", ""), "annotations/val2017", "images/val2017",
                             "annotations/val2017", ".jpg", "_labelTrainIds.png", None, "identity"),
    "coco_object": Layout(("coco_stuff164k", ""), "annotations/val2017", "images/val2017",
                          "annotations/val2017", ".jpg", "_labelTrainIds.png", None, "coco_object"),
    "cityscapes": Layout(("cityscapes", ""), "gtFine/val", "leftImg8bit/val", "gtFine/val",
                         "_leftImg8bit.png", "_gtFine_labelTrainIds.png", None, "identity"),
    "ade20k": Layout(("ADEChallengeData2016", ""), "annotations/validation", "images/validation",
                     "annotations/validation", ".jpg", ".png", None, "reduce_zero_label"),
}


# ----------------------------------------------------------------------------- label decoding

def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """MMSegmentation's reduce_zero_label: 0 -> 255, v -> v - 1, 255 stays 255. ``(H, W) int64``."""
    out = raw.astype(np.int64) - 1
    out[raw == 0] = IGNORE
    out[raw == IGNORE] = IGNORE
    return out


def coco_object_from_stuff(raw: np.ndarray) -> np.ndarray:
    """COCO-Stuff164k trainIds -> COCO-Object: 0..79 -> 1..80, 80..170 -> 0, 255 stays. ``int64``."""
    raw = raw.astype(np.int64)
    out = np.where(raw < 80, raw + 1, 0)
    out[raw == IGNORE] = IGNORE
    bad = (raw > 170) & (raw != IGNORE)
    if bad.any():
        raise ValueError(f"COCO-Stuff trainId out of range: {np.unique(raw[bad])[:10].tolist()}")
    return out


_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda a: a,
    "reduce_zero_label": reduce_zero_label,
    "coco_object": coco_object_from_stuff,
}


# ----------------------------------------------------------------------------- the source

@dataclass
class LabelledSource:
    """A list of (image, label) pairs plus the class space the labels are decoded into."""

    name: str                              # benchmark name, or "custom"
    pairs: list[tuple[str, str]]           # (image_uri, label_uri)
    class_names: list[str]
    ignore_index: int
    transform: str = "identity"
    storage_options: dict = field(default_factory=dict)
    root: Optional[str] = None             # the data root; custom labels: None (the images' listing has it)

    def __post_init__(self):
        if 0 <= self.ignore_index < len(self.class_names):
            raise ValueError(
                f"the ignore index {self.ignore_index} is also class {self.ignore_index} "
                f"({self.class_names[self.ignore_index]!r}) of the {len(self.class_names)} classes, whose pixels "
                f"would never be scored; pass --ignore-index with the value your labels use for unlabelled "
                f"pixels, outside 0-{len(self.class_names) - 1} (65535 in 16-bit label PNGs)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_ids(self) -> list[str]:
        return [image_stem(img) for img, _ in self.pairs]

    def decode_label(self, data: bytes) -> np.ndarray:
        """Label PNG bytes -> ``(H, W) int64`` class indices in [0, K), ``ignore_index`` elsewhere.

        Raises if a non-ignored value falls outside [0, K) (a wrong vocabulary or label file).
        """
        lab = _TRANSFORMS[self.transform](decode_label_png(data))
        bad = ((lab < 0) | (lab >= self.num_classes)) & (lab != self.ignore_index)
        if bad.any():
            vals = np.unique(lab[bad])[:10].tolist()
            hint = (f"; if {vals[0]} marks unlabelled pixels (as 11 does in CamVid), it is the ignore index "
                    f"(jobs/segment_dataset.py: --ignore-index {vals[0]})" if len(vals) == 1 else "")
            raise ValueError(
                f"{self.name}: label values {vals} are outside [0, {self.num_classes}) and not the "
                f"ignore index {self.ignore_index}; check the vocabulary / --ignore-index{hint}")
        return lab

    def read_label(self, label_uri: str) -> np.ndarray:
        """Read and decode one label file; see :meth:`decode_label`."""
        data = read_uris([label_uri], self.storage_options)[0]    # no "::" URL chaining, retried
        if isinstance(data, BaseException):
            raise data
        return self.decode_label(data)


def image_stem(uri: str) -> str:
    """The file name without extension (and without a Cityscapes ``_leftImg8bit`` suffix)."""
    base = posixpath.basename(uri.rstrip("/"))
    if base.endswith("_leftImg8bit.png"):
        return base[: -len("_leftImg8bit.png")]
    return posixpath.splitext(base)[0]


def open_labelled_source(
    benchmark: Optional[str] = None,
    data_root: Optional[str] = None,
    labels: Optional[str] = None,
    image_uris: Optional[Sequence[str]] = None,
    class_names: Optional[Sequence[str]] = None,
    ignore_index: int = IGNORE,
    storage_options: Optional[dict] = None,
    limit: Optional[int] = None,
    image_root: Optional[str] = None,
    transform: str = "identity",
) -> LabelledSource:
    """Open a benchmark (``benchmark`` + ``data_root``) or custom labels (``labels`` + ``image_uris``
    + ``class_names``, decoded with ``transform``: a benchmark's, for labels in its encoding); see the
    module docstring."""
    so = dict(storage_options or {})
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if benchmark is not None:
        if labels is not None:
            raise ValueError("give either benchmark= or labels=, not both")
        if data_root is None:
            raise ValueError("benchmark= needs data_root=")
        src = _open_benchmark(benchmark, data_root, so, limit)
    else:
        if labels is None or image_uris is None or class_names is None:
            raise ValueError("custom labels need labels=, image_uris= and class_names=")
        if transform not in _TRANSFORMS:
            raise ValueError(f"unknown label transform {transform!r}; known: {sorted(_TRANSFORMS)}")
        src = _open_custom(labels, list(image_uris), list(class_names), int(ignore_index), so, image_root, limit)
        src.transform = transform
    if limit is not None:
        src.pairs = src.pairs[:limit]
    return src


# ----------------------------------------------------------------------------- internals

def _fs_and_path(uri: str, so: dict):
    fs, path = get_fs(uri, so)
    return fs, canonical_path(fs, path)


def _list_files(fs, directory: str, suffix: str) -> list[str]:
    """All files below ``directory`` (recursive) whose name ends with ``suffix``, sorted. On a local disk
    symlinked folders inside it are followed, as for the job's ``--input`` (:func:`sources.find_files`)."""
    return sorted(p for p in find_files(fs, directory) if p.endswith(suffix))


def _find_dataset_dir(fs, root: str, layout: Layout, benchmark: str) -> str:
    tried = []
    for sub in layout.dataset_dirs:
        cand = posixpath.join(root, sub) if sub else root
        tried.append(posixpath.join(cand, layout.marker))
        if fs.isdir(posixpath.join(cand, layout.marker)):
            return cand
    if not fs.isdir(root):
        raise FileNotFoundError(f"{benchmark}: the data root {root!r} is not a folder (--data-root)")
    raise FileNotFoundError(
        f"{benchmark}: no prepared dataset under {root!r}; looked for: {', '.join(tried)}. --data-root is an "
        f"MMSegmentation-style data/ folder, or one dataset's own folder (such as .../VOCdevkit/VOC2012); for "
        f"several datasets kept apart, make a data/ folder of links laid out as the README shows")


def _open_benchmark(benchmark: str, data_root: str, so: dict, limit: Optional[int] = None) -> LabelledSource:
    """The benchmark's split under ``data_root``: its first ``limit`` images (in the split file's order, else
    sorted), each checked for its image and label file; the images past ``limit`` are not checked."""
    import rfclip.benchmarks as rb  # the presets: class names, reduce_zero_label

    if benchmark not in BENCHMARK_LAYOUTS:
        raise ValueError(f"unknown benchmark {benchmark!r}; one of {sorted(BENCHMARK_LAYOUTS)}")
    preset = rb.BENCHMARKS[benchmark]
    layout = BENCHMARK_LAYOUTS[benchmark]
    if bool(preset.reduce_zero_label) != (layout.transform == "reduce_zero_label"):
        raise RuntimeError(f"{benchmark}: preset reduce_zero_label={preset.reduce_zero_label} "
                           f"disagrees with the label layout ({layout.transform})")
    fs, root = _fs_and_path(data_root, so)
    ds = _find_dataset_dir(fs, root, layout, benchmark)
    img_dir = posixpath.join(ds, layout.image_dir)
    lab_dir = posixpath.join(ds, layout.label_dir)
    labels_present = set(_list_files(fs, lab_dir, layout.label_suffix))
    if layout.split_file is not None:
        split = posixpath.join(ds, layout.split_file)
        if not fs.isfile(split):
            raise FileNotFoundError(f"{benchmark}: split file {split} not found")
        ids = [ln.strip() for ln in fs.cat_file(split).decode().splitlines() if ln.strip()][:limit]
        images_present = set(_list_files(fs, img_dir, layout.image_suffix))
        images = [posixpath.join(img_dir, i + layout.image_suffix) for i in ids]
        missing_img = [p for p in images if p not in images_present]
        if missing_img:
            raise FileNotFoundError(f"{benchmark}: {len(missing_img)} images listed in {split} are "
                                    f"missing, e.g. {missing_img[:3]}")
    else:
        images = sorted(_list_files(fs, img_dir, layout.image_suffix))[:limit]
    pairs, missing = [], []
    for img in images:
        rel = posixpath.relpath(img, img_dir)
        lab = posixpath.join(lab_dir, rel[: -len(layout.image_suffix)] + layout.label_suffix)
        (pairs if lab in labels_present else missing).append((img, lab))
    if missing:
        raise FileNotFoundError(f"{benchmark}: {len(missing)} images have no label file, e.g. "
                                f"{[m[1] for m in missing[:3]]}")
    if not pairs:
        raise FileNotFoundError(f"{benchmark}: no images found in {img_dir}")
    ignore = IGNORE  # every benchmark decodes ignored pixels (incl. reduced zeros) to 255
    names = rb.class_names(preset.vocabulary, benchmark)
    return LabelledSource(benchmark, [(full_uri(fs, i), full_uri(fs, l)) for i, l in pairs], names, ignore,
                          layout.transform, so, root=full_uri(fs, ds.rstrip("/")))   # ids: either --data-root spelling


def _relative_stem(path: str, root: Optional[str]) -> Optional[str]:
    """``sub/<stem>`` of ``path`` below ``root`` (see :func:`image_stem`), or None outside it."""
    rel = relative_to(path, root)
    return None if rel is None else posixpath.join(posixpath.dirname(rel), image_stem(rel))


def _open_custom(labels: str, image_uris: list[str], class_names: list[str], ignore_index: int,
                 so: dict, image_root: Optional[str] = None, limit: Optional[int] = None) -> LabelledSource:
    """Pair each image with ``<labels>/<sub>/<stem>.png`` where it lies at ``<image_root>/<sub>/<stem>.*``
    (labels laid out as the images are). An image without one takes the label file of its stem anywhere
    under ``labels``, as long as neither that stem nor that file could belong to another image: a
    flat folder of labels serves nested images with distinct stems. Anything else is an error, never a
    guess. With ``limit``, only the first ``limit`` images are paired (and need a label), but a stem is
    still shared with every image given, so a ``--limit`` run pairs as the full run does."""
    if not image_uris:
        raise ValueError("custom labels: no images given")
    if not class_names:
        raise ValueError("custom labels: empty vocabulary")
    fs, lab_root = _fs_and_path(labels, so)
    if not fs.isdir(lab_root):
        raise FileNotFoundError(f"labels folder {labels!r} not found")
    files = _list_files(fs, lab_root, ".png")
    by_rel = {_relative_stem(p, lab_root): p for p in files}
    by_stem: dict[str, list[str]] = {}
    for p in files:
        by_stem.setdefault(image_stem(p), []).append(p)
    rels = [_relative_stem(img, image_root) for img in image_uris]
    image_stems, image_rels = Counter(image_stem(img) for img in image_uris), Counter(rels)
    pairs, missing, ambiguous = [], [], []
    for img, rel in list(zip(image_uris, rels))[:limit]:
        lab = by_rel.get(rel) if rel is not None else None
        if lab is not None and image_rels[rel] > 1:           # a/0.jpg and a/0.png: one label, two images
            ambiguous.append(f"{img} ({image_rels[rel]} images are {rel!r} with another extension)")
            continue
        if lab is None:
            stem = image_stem(img)
            found = by_stem.get(stem, [])
            if not found:
                missing.append(img)
                continue
            if len(found) > 1 or image_stems[stem] > 1:
                expected = f"no {posixpath.join(lab_root, rel)}.png, and " if rel is not None else ""
                ambiguous.append(f"{img} ({expected}stem {stem!r} is shared by {image_stems[stem]} images "
                                 f"and {len(found)} label files, e.g. {found[:2]})")
                continue
            lab = found[0]
        pairs.append((img, full_uri(fs, lab)))
    if ambiguous:
        raise ValueError(f"{len(ambiguous)} images can't be paired with a label by file name alone, e.g. "
                         f"{ambiguous[:2]}. Lay the labels out as the images are (<labels>/<sub>/<stem>.png for "
                         f"<input>/<sub>/<stem>.jpg), or pair them in a Parquet manifest (--labels-from-manifest)")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(image_uris[:limit])} images have no label "
                                f"<stem>.png in {labels}, e.g. {missing[:3]}")
    return LabelledSource("custom", pairs, class_names, ignore_index, "identity", so)
