"""Segment images from the command line.

    rfclip-segment IMAGE_OR_FOLDER... --vocabulary "sky, cloud; road; car" --weights PATH --out DIR \
        [--method M] [--overlay]

(also ``python -m rfclip.segment``). A folder stands for the images below it (recursively, sorted).

Writes ``DIR/<stem>.png``, a palette PNG whose pixel values are class indices (a 16-bit grey PNG above
256 classes, which no palette holds), and with ``--overlay`` ``DIR/<stem>_overlay.png``, the image with
coloured classes and a legend. No output overwrites another: images whose stems clash keep their suffix
(``a.jpg.png``, ``a.png.png``), then their folder (``x/a.jpg.png``); see :func:`output_names`. Outputs carry
the PNG text chunk ``Software: rfclip-segment``; a file under an output's name without it is never replaced.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from .cli_args import DefaultsHelpFormatter, add_model_arguments, parse_settings, positive_int
from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_file
from .folders import local_files, within
from .images import IMAGE_SUFFIXES
from .segmenter import Segmenter
from .visualize import first_is_background, label_png, overlay, png_text
from .weights import WeightsError
from .vocabulary import load_vocabulary, parse_vocabulary
from .warn import as_cli_lines


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


def image_files(args: list[str], out: str | None = None) -> list[str]:
    """``args`` with each folder replaced by the image files below it (``rfclip.images.IMAGE_SUFFIXES``,
    recursively, sorted); files are kept as given, images or not (a bad file is reported, not skipped).

    Links to folders are followed, each real folder once: not a cycle, not a link to the folder walked or
    above it, not a link to a folder inside it (it is listed by its own path). A file given twice (or
    reached twice) is listed once, and the folder ``out`` is left out, so a second run does not segment
    the first one's masks. ``ValueError`` when a folder given is ``out``."""
    out_real = os.path.realpath(out) if out is not None else None
    listed: list[str] = []
    for a in args:
        if not os.path.isdir(a):
            listed.append(a)
            continue
        if os.path.realpath(a) == out_real:
            raise ValueError(f"the input folder {a} is --out: the masks would overwrite or join the images; "
                             f"give another --out")
        found = _images_below(a, out_real)
        if not found:
            print(f"{a}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})", file=sys.stderr)
        listed += sorted(found)
    unique: dict[str, str] = {}
    for p in listed:
        unique.setdefault(os.path.realpath(p), p)
    return list(unique.values())


def _images_below(folder: str, skip: str | None) -> list[str]:
    """The image files below ``folder``, leaving out the real folder ``skip`` (rules: :func:`image_files`)."""
    return [f for f in local_files(folder, skip) if os.path.basename(f).lower().endswith(IMAGE_SUFFIXES)]


# The PNG text chunk that marks this tool's masks and overlays: the only files in --out it replaces.
MARK = {"Software": "rfclip-segment"}


def _is_ours(path: Path) -> bool:
    """Whether the file ``path`` is a PNG this tool wrote: its :data:`MARK` text chunk. (Not its palette:
    VOC's ground-truth PNGs have the same.)"""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == MARK["Software"]
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def _replaced_files(targets: list[Path]) -> list[Path]:
    """The ``targets`` that exist and that this tool did not write: a user's own files, never replaced."""
    return [t for t in targets if os.path.lexists(t) and not (t.is_file() and _is_ours(t))]


def _overwritten_input(images: list[str], folders: list[str], out: str, targets: list[Path]) -> str | None:
    """Why one of ``targets`` can't be written: it would overwrite an input image, or land inside an input
    folder (a later run would take it for an image) that does not hold ``out``; else None."""
    inputs = {os.path.realpath(p): p for p in images}
    out_real = os.path.realpath(out)
    holding = [(os.path.realpath(f), f) for f in folders if not within(out_real, os.path.realpath(f))]
    for t in targets:
        real = os.path.realpath(t)
        if real in inputs:
            return f"an output in --out {out} would overwrite the input {inputs[real]}"
        inside = next((f for rf, f in holding if within(real, rf)), None)
        if inside is not None:
            return f"an output in --out {out}, {t}, would land inside the input folder {inside}"
    return None


class _Refused(Exception):
    """A command line that can't run; the message says why."""


def _plan(args) -> tuple[list[str], list[str], list[Path]]:
    """The images, their output names, and the folders made for ``--out`` (to remove if the model fails)."""
    out = Path(args.out)
    if out.is_symlink() and not out.exists():
        raise _Refused(f"--out {args.out} is a link to nothing: can't make the output folder there")
    if out.exists() and not out.is_dir():
        raise _Refused(f"--out {args.out} is a file, not a folder: can't make the output folder there")
    # Only what the command line names: a broken link inside a folder is a file that can't be read, reported
    # with the others while the rest are segmented.
    missing = [a for a in args.images if not os.path.lexists(a)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise _Refused(f"no such file or folder: {missing[0]}{more}")
    try:
        images = image_files(args.images, args.out)
    except ValueError as e:
        raise _Refused(str(e)) from None
    if not images:
        raise _Refused("no images to segment")
    names = output_names(images, args.overlay)
    targets = [out / f"{n}{end}.png" for n in names for end in (("", "_overlay") if args.overlay else ("",))]
    folders = [a for a in args.images if os.path.isdir(a)]
    clash = _overwritten_input(images, folders, args.out, targets)
    if clash is not None:
        raise _Refused(f"{clash}; give another --out")
    theirs = _replaced_files(targets)
    if theirs:
        more = f" (and {len(theirs) - 1} more)" if len(theirs) > 1 else ""
        raise _Refused(f"--out {args.out} already holds {theirs[0]}{more}, which rfclip-segment did not write; "
                       f"give another --out, or move it away")
    made = [d for d in [out, *out.parents] if not d.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _Refused(f"--out {args.out}: can't make the output folder: {e.strerror or e}") from None
    try:                      # a write, not os.access: permissions, read-only mounts and immutable folders
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        _remove(made)
        raise _Refused(f"--out {args.out}: can't write in this folder: {e.strerror or e}") from None
    return images, names, made


def _write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary name, then renamed): a full disk never
    leaves a cut-off PNG under the final name. (The job's ``pipeline.storage.atomic_write_bytes`` does this
    on any filesystem; the library does not import the pipeline, and this tool writes to local disk only.)"""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove(made: list[Path]) -> None:
    """Remove the folders ``made`` (outermost first) while they are empty: a run that wrote nothing
    leaves none behind (the local-disk form of ``pipeline.storage.remove_empty_folders``)."""
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            break


def _segmenter(args) -> Segmenter:
    vocabulary = (parse_vocabulary(args.vocabulary) if args.vocabulary is not None
                  else load_vocabulary(args.vocabulary_file) if args.vocabulary_file is not None else None)
    return Segmenter(model=args.model, weights=args.weights, method=args.method, vocabulary=vocabulary,
                     device=args.device, weights_sha256=args.weights_sha256, benchmark=args.benchmark,
                     quick_gelu=args.quick_gelu, image_mean=args.image_mean, image_std=args.image_std,
                     **parse_settings(args.setting, args.precision))


def main(argv: list[str] | None = None) -> int:
    with as_cli_lines():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
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

    try:
        images, names, made = _plan(args)    # before the model loads: a bad folder fails at once
    except _Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        seg = _segmenter(args)
    except (WeightsError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        _remove(made)
        return 2
    out = Path(args.out)
    failed = 0
    for path, name in zip(images, names):
        t0 = time.perf_counter()
        try:
            rgb = decode_file(path, args.max_pixels)
        except (OSError, DecodeError) as e:
            print(f"{path}: cannot read image: {e}", file=sys.stderr)
            failed += 1
            continue
        labels = seg.predict(rgb)
        target = out / f"{name}.png"
        writing = target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_whole(target, label_png(labels, seg.num_classes, background=first_is_background(seg.class_names),
                                           text=MARK))
            if args.overlay:
                writing = out / f"{name}_overlay.png"
                buffer = io.BytesIO()
                overlay(rgb, labels, seg.class_names).save(buffer, format="PNG", pnginfo=png_text(MARK))
                _write_whole(writing, buffer.getvalue())
        except OSError as e:                     # a full disk, a folder where the file goes: the rest would fail too
            unread = f"; {failed} images before it could not be read (reasons above)" if failed else ""
            print(f"error: can't write {writing}: {e.strerror or e}; the masks written so far are kept{unread}",
                  file=sys.stderr)
            return 1
        present = len(set(labels.flatten().tolist()))
        print(f"{path}: {labels.shape[1]}x{labels.shape[0]}, {present} class{'' if present == 1 else 'es'}, "
              f"{(time.perf_counter() - t0) * 1000:.0f} ms -> {target}")
    if failed:
        print(f"{failed} of {len(images)} images could not be read (reasons above); the other masks are in "
              f"{args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
