"""Segment images from the command line.

    rfclip-segment IMAGE_OR_FOLDER... --vocabulary "sky, cloud; road; car" --weights PATH --out DIR \
        [--method M] [--overlay]

(also ``python -m rfclip.segment``). A folder stands for the images below it (recursively, sorted).

Writes ``DIR/<stem>.png``, a palette PNG whose pixel values are class indices, and with ``--overlay``
``DIR/<stem>_overlay.png``, the image with coloured classes and a legend. No output overwrites
another: images whose stems clash keep their suffix (``a.jpg.png``, ``a.png.png``), then their folder
(``x/a.jpg.png``); see :func:`output_names`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from .cli_args import DefaultsHelpFormatter, add_model_arguments, parse_settings, positive_int
from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_file
from .images import IMAGE_SUFFIXES
from .segmenter import Segmenter
from .visualize import first_is_background, label_png, overlay
from .weights import WeightsError
from .vocabulary import load_vocabulary, parse_vocabulary


def output_names(paths: list[str], overlay: bool = False) -> list[str]:
    """Output names (without ``.png``) for ``paths``, distinct for distinct files.

    A file's name is its stem where no other input shares it; else its file name (``a.jpg``); else its
    path from the folder the clashing inputs share (``x/a.jpg``); and where a name still clashes, with
    its outputs (and ``<name>_overlay`` with ``overlay``), a ``-2``, ``-3`` ... suffix.
    """
    absolute = [os.path.abspath(p) for p in paths]
    distinct = list(dict.fromkeys(absolute))
    names = {a: Path(a).stem for a in distinct}

    def relative(a: str, members: list[str]) -> str:
        try:
            common = os.path.commonpath([os.path.dirname(m) for m in members])
        except ValueError:                            # different drives: nothing shared
            return a
        return os.path.relpath(a, common).replace(os.sep, "/")

    for rename in (lambda a, members: Path(a).name, relative):
        groups: dict[str, list[str]] = defaultdict(list)
        for a in distinct:
            groups[names[a]].append(a)
        for members in groups.values():
            if len(members) > 1:
                for a in members:
                    names[a] = rename(a, members)
    taken: set[str] = set()
    for a in distinct:
        base, k, name = names[a], 1, names[a]
        while name in taken or (overlay and f"{name}_overlay" in taken):
            k += 1
            name = f"{base}-{k}"
        taken.update([name, f"{name}_overlay"] if overlay else [name])
        names[a] = name
    return [names[a] for a in absolute]


def image_files(args: list[str]) -> list[str]:
    """``args`` with each folder replaced by the image files below it (``rfclip.images.IMAGE_SUFFIXES``,
    recursively, sorted); files are kept as given, images or not (a bad file is reported, not skipped)."""
    out = []
    for a in args:
        if os.path.isdir(a):
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(a, followlinks=True) for f in files
                           if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                print(f"{a}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})", file=sys.stderr)
            out += found
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    prog = "rfclip-segment" if os.path.basename(sys.argv[0]) == "rfclip-segment" else "python -m rfclip.segment"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("images", nargs="+", help="image files, or folders of them")
    voc = p.add_mutually_exclusive_group(required=True)
    voc.add_argument("--vocabulary", help='classes: ";" between classes, ", " between synonyms')
    voc.add_argument("--vocabulary-file", help="a cls_*.txt file: one class per line")
    voc.add_argument("--benchmark", help="use a benchmark's classes and the method's settings for it")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overlay", action="store_true", help="also write a colour overlay with a legend")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help="larger images are refused from their header")
    add_model_arguments(p)
    args = p.parse_args(argv)

    out = Path(args.out)                     # before the model loads: a bad folder fails at once
    if out.exists() and not out.is_dir():
        print(f"error: --out {args.out} is a file, not a folder: can't make the output folder there", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out {args.out}: can't make the output folder: {e.strerror or e}", file=sys.stderr)
        return 2
    images = image_files(args.images)
    if not images:
        print("error: no images to segment", file=sys.stderr)
        return 2

    try:
        vocabulary = (parse_vocabulary(args.vocabulary) if args.vocabulary
                      else load_vocabulary(args.vocabulary_file) if args.vocabulary_file else None)
        seg = Segmenter(model=args.model, weights=args.weights, method=args.method, vocabulary=vocabulary,
                        device=args.device, weights_sha256=args.weights_sha256, benchmark=args.benchmark,
                        quick_gelu=args.quick_gelu, image_mean=args.image_mean, image_std=args.image_std,
                        **parse_settings(args.setting, args.precision))
    except (WeightsError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for path, name in zip(images, output_names(images, args.overlay)):
        t0 = time.perf_counter()
        try:
            rgb = decode_file(path, args.max_pixels)
        except (OSError, DecodeError) as e:
            print(f"{path}: cannot read image: {e}", file=sys.stderr)
            failed += 1
            continue
        labels = seg.predict(rgb)
        target = out / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(label_png(labels, seg.num_classes, background=first_is_background(seg.class_names)))
        if args.overlay:
            overlay(rgb, labels, seg.class_names).save(out / f"{name}_overlay.png")
        present = len(set(labels.flatten().tolist()))
        print(f"{path}: {labels.shape[1]}x{labels.shape[0]}, {present} class{'' if present == 1 else 'es'}, "
              f"{(time.perf_counter() - t0) * 1000:.0f} ms -> {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
