"""Inputs of the job: a folder / prefix listed recursively, or a manifest of image URIs, then
cut into deterministic shards.

An input item is a dict ``{"image_uri": str, "label_uri": str | None}``. Items are sorted by
``image_uri`` and cut into shards of ``shard_size``; shard ``i`` is named ``shard-{i:05d}`` and
carries a sha256 digest of its URIs, so the same inputs and shard size give the same shards on
every run, and a resumed run can tell when they do not.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import io
import logging
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from rfclip import folders
from rfclip.images import IMAGE_SUFFIXES as IMAGE_EXTENSIONS  # one list for every tool

from .storage import canonical_path, canonical_uri, full_uri, get_fs, is_local, protocol_of, scrub

log = logging.getLogger(__name__)

MANIFEST_URI_COLUMNS = ("image_uri", "uri", "path", "image")


@dataclass(frozen=True)
class Inputs:
    """The resolved inputs: ``items`` sorted by image URI, ``root`` for relative ids (None: manifest)."""

    items: list[dict]
    root: Optional[str]
    kind: str                      # "folder" | "manifest" | "file"
    duplicates_dropped: int = 0

    @functools.cached_property
    def ids(self) -> dict[str, str]:
        """``image_uri`` -> its image id, unique among these inputs (:func:`image_ids`)."""
        return image_ids([it["image_uri"] for it in self.items], self.root)


@dataclass(frozen=True)
class Shard:
    """One unit of work and of commit: ``items[start:start+len]`` of the sorted inputs."""

    index: int
    name: str                      # "shard-00042"
    items: tuple[dict, ...]
    digest: str                    # sha256 over the shard's image (and label) URIs


def is_image_path(path: str) -> bool:
    """True if ``path`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def resolve_inputs(uri: str, storage_options: Optional[dict] = None, exclude: Optional[str] = None) -> Inputs:
    """List the images behind ``uri``: a folder/prefix (recursive), a manifest, or one image.

    Manifests: ``.parquet``, or ``.csv``/``.tsv`` with a header row (column ``image_uri``, or
    ``uri``/``path``/``image``; an optional ``label_uri`` column is carried along), or a text file with
    one URI per line (``.txt``, ``.lst``, ``.list`` or no suffix: ``MANIFEST_SUFFIXES``; blank lines and ``#``
    comments skipped; a header row is refused). Relative manifest entries are resolved against the manifest's folder, and
    every entry is spelled one way (``file:///x/a.jpg`` and ``/x/./a.jpg`` are ``/x/a.jpg``), so a file
    listed twice is processed once.
    On a local disk, symlinked folders are followed (see :func:`find_files`).
    ``exclude``: the job's output. When it lies inside a listed folder, the files under it are left out
    (the job's own masks and figures are not inputs of its next run); when it is that folder, ``ValueError``.
    Raises ``FileNotFoundError`` for a missing input and ``ValueError`` for an empty one.
    """
    fs, path = get_fs(uri, storage_options)
    path = canonical_path(fs, path)
    try:
        found = fs.exists(path)
    except Exception as exc:  # noqa: BLE001 - no credentials, no route to the endpoint...: said in one line
        raise ValueError(f"can't read input {scrub(uri)!r}: {type(exc).__name__}: {scrub(str(exc))}") from exc
    if not found:
        raise FileNotFoundError(f"input {uri!r} does not exist")
    if fs.isdir(path):
        files = find_files(fs, path, skip=_output_to_skip(fs, path, exclude, storage_options))
        items = [_item(full_uri(fs, f)) for f in files if is_image_path(f)]
        root, kind = full_uri(fs, path), "folder"
        if not items:
            raise ValueError(f"input {uri!r} contains no images (looked recursively for {', '.join(IMAGE_EXTENSIONS)}; "
                             f"{len(files)} other files found)")
    elif is_image_path(path):
        items, root, kind = [_item(full_uri(fs, path))], None, "file"
    elif posixpath.splitext(path.lower())[1] not in MANIFEST_SUFFIXES:
        raise ValueError(f"input {uri!r} is a file that is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a "
                         f"manifest ({', '.join(s for s in MANIFEST_SUFFIXES if s)}, or a text list without a suffix)")
    else:
        items, root, kind = _read_manifest(fs, path, storage_options), None, "manifest"
        if not items:
            raise ValueError(f"manifest {uri!r} lists no image URIs")
    return _dedupe_sorted(items, root, kind)


# Table manifests, then text lists of one URI a line ("" is a file without a suffix).
MANIFEST_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".txt", ".lst", ".list", "")

UNDECODABLE_PREFIX = "not-utf8:"


def _item(uri: str) -> dict:
    """A listed image. A local file name that is not valid UTF-8 (Python lists its bytes as lone
    surrogates) can't be written to Parquet or hashed as text: its URI is ``not-utf8:`` and the path
    with the bad bytes escaped (``not-utf8:/data/caf\\xe9.jpg``; no listed path starts so, so it names no
    other file), and ``error`` says why it is not read, so it becomes an error row."""
    try:
        uri.encode("utf-8")
        return {"image_uri": uri, "label_uri": None}
    except UnicodeEncodeError:
        shown = UNDECODABLE_PREFIX + uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        log.warning("file name is not valid UTF-8, not read: %s", shown)
        return {"image_uri": shown, "label_uri": None,
                "error": "file name is not valid UTF-8 (bytes shown as \\xNN): rename it to UTF-8 (e.g. with "
                         "convmv) to segment it"}


def find_files(fs, folder: str, skip: Optional[str] = None) -> list[str]:
    """Every file below ``folder``, but none below ``skip`` (the job's output: see :func:`_output_to_skip`).

    On a local disk symlinked folders are followed as ``rfclip.folders.local_files`` says (each real folder
    once), and a warning names each link not followed, and each folder that can't be read. There ``skip``
    is matched by real path, however the walk reaches it; on an object store, by prefix.
    """
    if not is_local(fs):
        files = fs.find(folder)
        if skip is None:
            return files
        kept = [f for f in files if not f.startswith(skip.rstrip("/") + "/")]
        if len(kept) < len(files):
            log.info("the output %s lies inside the input folder: its files are not listed as inputs", skip)
        return kept

    def skipped(sub: str, real: str, why: str) -> None:
        if why == folders.OUTPUT:
            log.info("%s is the output: its files are not listed as inputs", sub)
        else:
            log.warning("folder %s -> %s not followed: %s", sub, real, why)

    def unreadable(exc: OSError) -> None:
        log.warning("can't list %s, its files are left out: %s", exc.filename, exc.strerror or exc)

    return [fs._strip_protocol(p) for p in folders.local_files(folder, skip, skipped, unreadable)]


def _output_to_skip(fs, folder: str, output: Optional[str], storage_options: Optional[dict]) -> Optional[str]:
    """What :func:`find_files` leaves out of the input ``folder`` for the job's ``output``: its path on ``fs``,
    or None when it can't lie inside ``folder``. On a local disk that is any local output (a symlink may put
    it inside); on an object store, an output under ``folder``'s prefix.

    Raises ``ValueError`` when ``output`` is ``folder`` itself.
    """
    if output is None:
        return None
    out, root = canonical_uri(output, storage_options), full_uri(fs, folder)
    local_out = is_local(fs) and "://" not in out
    if out == root or (local_out and os.path.realpath(out) == os.path.realpath(root)):
        raise ValueError(f"the output {output!r} is the input folder; write to another folder (a sub-folder of "
                         f"the input is fine: its files are not listed as inputs)")
    if local_out:
        return out
    if is_local(fs) or not out.startswith(root.rstrip("/") + "/"):
        return None
    return canonical_path(fs, out)


def _read_manifest(fs, path: str, storage_options: Optional[dict]) -> list[dict]:
    base = posixpath.dirname(path)
    filesystems: dict = {}                     # by protocol: each entry is spelled as its filesystem does

    def canonical(entry: str) -> str:
        if "://" not in entry and not entry.startswith("/"):
            return full_uri(fs, canonical_path(fs, posixpath.normpath(posixpath.join(base, entry))))
        proto = protocol_of(entry)
        if proto not in filesystems:
            try:
                filesystems[proto] = get_fs(entry, storage_options)[0]
            except (ImportError, ValueError) as exc:
                raise ValueError(f"manifest {path!r}: can't open {entry!r}: {exc}") from exc
        return full_uri(filesystems[proto], canonical_path(filesystems[proto], entry))

    data = fs.cat_file(path)
    lower = path.lower()
    if lower.endswith((".parquet", ".pq", ".csv", ".tsv")):
        if lower.endswith((".csv", ".tsv")):     # a header row names the columns, as a Parquet schema does
            import pyarrow.csv as pcsv

            try:
                table = pcsv.read_csv(io.BytesIO(data), parse_options=pcsv.ParseOptions(
                    delimiter="\t" if lower.endswith(".tsv") else ","),
                    convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in
                                                                      MANIFEST_URI_COLUMNS + ("label_uri",)}))
            except pa.ArrowInvalid as exc:
                raise ValueError(f"manifest {path!r} is not a readable CSV/TSV file: {exc}") from exc
        else:
            table = pq.read_table(io.BytesIO(data))
        col = next((c for c in MANIFEST_URI_COLUMNS if c in table.column_names), None)
        if col is None:
            raise ValueError(f"manifest {path!r} needs a column named one of {MANIFEST_URI_COLUMNS} (a header "
                             f"row in CSV); it has {table.column_names}")
        uris = [u for u in table.column(col).to_pylist()]
        labels = table.column("label_uri").to_pylist() if "label_uri" in table.column_names else [None] * len(uris)
    else:
        try:
            text = data.decode("utf-8-sig")       # a byte-order mark (Windows editors) is not part of the first URI
        except UnicodeDecodeError as exc:
            raise ValueError(f"manifest {path!r} is neither Parquet nor UTF-8 text: {exc}") from exc
        uris = [ln.strip() for ln in text.splitlines()]
        uris = [u for u in uris if u and not u.startswith("#")]
        head = uris[0].replace("\t", ",").split(",")[0].strip() if uris else ""
        if head in MANIFEST_URI_COLUMNS + ("label_uri",):
            raise ValueError(f"manifest {path!r} starts with a header row ({uris[0]!r}), so it is a table: name it "
                             f".csv or .tsv (or write Parquet); a text manifest holds one URI per line")
        labels = [None] * len(uris)
    out = []
    for u, lab in zip(uris, labels):
        if u is None or not str(u).strip():
            continue
        lab = str(lab).strip() if lab is not None else ""
        out.append({"image_uri": canonical(str(u).strip()), "label_uri": canonical(lab) if lab else None})
    return out


def inputs_from_items(items: list[dict], root: Optional[str] = None) -> Inputs:
    """:class:`Inputs` from given ``[{"image_uri", "label_uri"}]`` items: sorted, duplicates dropped.

    ``root``: the folder they were listed from (image ids are relative to it); None hashes whole URIs.
    """
    return _dedupe_sorted(items, root, "items")


def _dedupe_sorted(items: list[dict], root: Optional[str], kind: str) -> Inputs:
    by_uri: dict[str, dict] = {}
    for it in items:
        first = by_uri.setdefault(it["image_uri"], it)
        a, b = first.get("label_uri"), it.get("label_uri")
        if a and b and a != b:                   # one image, two labels: which one to score is unknowable
            raise ValueError(f"{kind}: image {scrub(it['image_uri'])} is listed twice with different labels "
                             f"({scrub(a)}, {scrub(b)})")
        if b and not a:                          # a label given for one of the entries holds for the image
            by_uri[it["image_uri"]] = {**first, "label_uri": b}
    dropped = len(items) - len(by_uri)
    if dropped:
        log.warning("inputs list %d duplicate image URIs; each image is processed once", dropped)
    return Inputs([by_uri[u] for u in sorted(by_uri)], root, kind, dropped)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def relative_to(uri: str, root: Optional[str]) -> Optional[str]:
    """``uri``'s path below the folder ``root`` (``"sub/a.jpg"``), or None when it is not below it."""
    if not root:
        return None
    root = root.rstrip("/") + "/"
    return uri[len(root):] if uri.startswith(root) else None


def image_id(image_uri: str, root: Optional[str] = None, digits: int = 10) -> str:
    """A stable, file-name-safe id: ``<stem>-<10 (``digits``) hex of sha1(path relative to root)>``.

    Relative to the input root, so the same corpus copied to another bucket keeps its ids;
    with a manifest (no root) the whole URI is hashed.
    """
    rel = relative_to(image_uri, root)
    rel = image_uri if rel is None else rel.lstrip("/")
    stem = posixpath.splitext(posixpath.basename(image_uri))[0]
    stem = _SAFE.sub("_", stem).strip("._")[:64] or "image"
    return f"{stem}-{hashlib.sha1(rel.encode('utf-8')).hexdigest()[:digits]}"


def image_ids(uris: Sequence[str], root: Optional[str] = None) -> dict[str, str]:
    """The :func:`image_id` of each URI, made unique: the ids that two inputs share (the same stem, and 40
    bits of their hashes alike: likely once a million files share a stem, as ``rgb.png`` in a folder per
    scene) take 20 hex digits of the hash instead, for every input that shares it, so the masks of one
    never overwrite the other's. Deterministic for a given input list, so a resume finds the same ids."""
    ids = {u: image_id(u, root) for u in uris}
    count = collections.Counter(ids.values())
    for u, i in ids.items():
        if count[i] > 1:
            ids[u] = image_id(u, root, digits=20)
    if len(set(ids.values())) != len(ids):
        raise ValueError("two inputs have the same image id even with 80 bits of their hashes")
    return ids


def items_digest(items: Sequence[dict]) -> str:
    """sha256 over the items' ``image_uri`` and ``label_uri``, in order."""
    h = hashlib.sha256()
    for it in items:
        h.update(it["image_uri"].encode("utf-8"))
        h.update(b"\t")
        h.update((it.get("label_uri") or "").encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def make_shards(items: Sequence[dict], shard_size: int) -> list[Shard]:
    """Cut the (already sorted) items into consecutive shards of ``shard_size`` (the last may be short)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shards = []
    for i, start in enumerate(range(0, len(items), shard_size)):
        chunk = tuple(items[start:start + shard_size])
        shards.append(Shard(i, f"shard-{i:05d}", chunk, items_digest(chunk)))
    return shards
