"""Vocabularies: classes in label order, each a list of synonym names.

The text format is the benchmark class-name files' (``cls_*.txt``): one class per line, synonyms on a
line separated by ", ". On the command line, ";" separates classes and ", " separates synonyms.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Union

import fsspec

VocabularyLike = Union[str, Sequence[Union[str, Sequence[str]]]]


def _split_names(line: str) -> list[str]:
    return [name.strip() for name in line.split(",") if name.strip()]


def parse_vocabulary(text: str) -> list[list[str]]:
    """Parse ``"sky, cloud; road; car"`` into ``[["sky", "cloud"], ["road"], ["car"]]``. A trailing ``;``
    is allowed; an empty class between two (``"sky;;road"``) is an error, since label indices follow
    the classes' order and dropping it would shift them."""
    parts = text.split(";")
    if parts and not parts[-1].strip():
        parts = parts[:-1]
    if not any(_split_names(part) for part in parts):
        raise ValueError(f"the vocabulary is empty: give at least one class ({text!r})")
    for i, part in enumerate(parts):
        if not _split_names(part):
            raise ValueError(f"vocabulary class {i} (between two ';') has no name: {text!r}")
    return normalize_vocabulary([_split_names(part) for part in parts])


def load_vocabulary(path: str, storage_options: dict | None = None) -> list[list[str]]:
    """Read a ``cls_*.txt`` file (local path or fsspec URL): one class per line, ", " synonyms. Blank
    lines at the end are ignored; one between classes is an error (label indices follow the lines)."""
    try:
        with fsspec.open(path, "r", encoding="utf-8-sig", **(storage_options or {})) as f:   # -sig: drop a BOM
            lines = f.read().splitlines()
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a class file (one class per line)") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"vocabulary file {path} does not exist (a cls_*.txt file: one class per "
                                f"line)") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 text file of class names ({e.reason} at byte {e.start})") from None
    except (ImportError, ValueError) as e:         # fsspec: a protocol it does not know, or whose package is missing
        raise ValueError(f"can't read vocabulary file {path}: {e}") from e
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - a storage client's own error (botocore: no credentials, no endpoint)
        raise OSError(f"can't read vocabulary file {path}: {type(e).__name__}: {e}") from e
    classes = [_split_names(line) for line in lines]
    while classes and not classes[-1]:
        classes.pop()
    for i, c in enumerate(classes):
        if not c:
            raise ValueError(f"{path}: line {i + 1} is blank; each line is a class, and label indices follow "
                             f"the lines, so a class needs a name there")
    return normalize_vocabulary(classes)


def normalize_vocabulary(vocabulary: VocabularyLike) -> list[list[str]]:
    """Accept a ``;``-string, a list of names, or a list of synonym lists; return synonym lists.

    Raises ``ValueError`` on an empty vocabulary or an empty class, on two classes with the same
    first name (a label's name would be ambiguous; the second could never win a pixel when their
    synonyms are the same too; names are compared ignoring case, as CLIP's tokenizer lowercases them), and
    ``TypeError`` on a class that is not a name or a list of names, or on a set or a mapping, whose order is not the label
    order the user means. A name may appear in several classes among their synonyms (the COCO-Object
    file lists "bed" both as a thing and among the background words); each occurrence is its own query.
    """
    if isinstance(vocabulary, str):
        return parse_vocabulary(vocabulary)
    if vocabulary is None:
        raise TypeError("the vocabulary is None: give the class names, e.g. \"sky; road; car\" or [\"sky\", \"road\"]")
    if isinstance(vocabulary, (set, frozenset, Mapping)):
        raise TypeError(f"a vocabulary is a list of classes in label order, not a {type(vocabulary).__name__} "
                        f"(a set's order changes between runs; a dict's synonyms are ambiguous): pass "
                        f"[\"sky\", [\"car\", \"vehicle\"], ...]")
    out: list[list[str]] = []
    first_seen: dict[str, int] = {}
    for i, entry in enumerate(vocabulary):
        if isinstance(entry, (set, frozenset, Mapping)):
            raise TypeError(f"vocabulary class {i} is a {type(entry).__name__}; give its names as a list "
                            f"(the first is the class's name)")
        if not isinstance(entry, str) and not (isinstance(entry, Sequence) and all(isinstance(n, str) for n in entry)):
            raise TypeError(f"vocabulary class {i} is {entry!r}; give a name, or a list of names (synonyms)")
        names = [entry] if isinstance(entry, str) else list(entry)
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise ValueError(f"vocabulary class {i} has no name")
        key = names[0].casefold()               # CLIP's tokenizer lowercases: "Sky" and "sky" are one query
        if key in first_seen:
            raise ValueError(f"vocabulary classes {first_seen[key]} and {i} are both named {names[0]!r} (names "
                             f"differing only in case are one to CLIP); give each class its own name (merge them "
                             f"as synonyms of one class instead)")
        first_seen[key] = i
        out.append(names)
    if not out:
        raise ValueError("the vocabulary is empty: give at least one class")
    return out


def flatten(vocabulary: Iterable[Sequence[str]]) -> tuple[list[str], list[int]]:
    """All query names in order, and for each name the index of its class."""
    names: list[str] = []
    owner: list[int] = []
    for c, synonyms in enumerate(vocabulary):
        for n in synonyms:
            names.append(n)
            owner.append(c)
    return names, owner
