"""Segment images from the command line.

    python -m rfclip.segment IMAGE... --vocabulary "sky, cloud; road; car" --weights PATH --out DIR \
        [--method M] [--overlay]

Writes ``DIR/<stem>.png``, a palette PNG whose pixel values are class indices, and with ``--overlay``
``DIR/<stem>_overlay.png``, the image with coloured classes and a legend.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image

from .cli_args import add_model_arguments, parse_settings
from .images import to_rgb_array
from .segmenter import Segmenter
from .visualize import label_png, overlay
from .weights import WeightsError
from .vocabulary import load_vocabulary, parse_vocabulary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rfclip.segment", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files")
    voc = p.add_mutually_exclusive_group(required=True)
    voc.add_argument("--vocabulary", help='classes: ";" between classes, ", " between synonyms')
    voc.add_argument("--vocabulary-file", help="a cls_*.txt file: one class per line")
    voc.add_argument("--benchmark", help="use a benchmark's classes and the method's settings for it")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overlay", action="store_true", help="also write a colour overlay with a legend")
    add_model_arguments(p)
    args = p.parse_args(argv)

    vocabulary = (parse_vocabulary(args.vocabulary) if args.vocabulary
                  else load_vocabulary(args.vocabulary_file) if args.vocabulary_file else None)
    try:
        seg = Segmenter(model=args.model, weights=args.weights, method=args.method, vocabulary=vocabulary,
                        device=args.device, weights_sha256=args.weights_sha256, benchmark=args.benchmark,
                        **parse_settings(args.setting, args.precision))
    except (WeightsError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in args.images:
        t0 = time.perf_counter()
        try:
            with Image.open(path) as im:
                rgb = to_rgb_array(im)
        except (OSError, ValueError) as e:
            print(f"{path}: cannot read image: {e}", file=sys.stderr)
            failed += 1
            continue
        labels = seg.predict(rgb)
        stem = Path(path).stem
        (out / f"{stem}.png").write_bytes(label_png(labels, seg.num_classes))
        if args.overlay:
            overlay(rgb, labels, seg.class_names).save(out / f"{stem}_overlay.png")
        print(f"{path}: {labels.shape[1]}x{labels.shape[0]}, {len(set(labels.flatten().tolist()))} classes, "
              f"{(time.perf_counter() - t0) * 1000:.0f} ms -> {out / (stem + '.png')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
