"""Vocabularies: classes in label order, each a list of synonym names.

The text format is the benchmark class-name files' (``cls_*.txt``): one class per line, synonyms on a
line separated by ", ". On the command line, ";" separates classes and ", " separates synonyms.
"""
from __future__ import annotations

from typing import Iterable, Sequence, Union

import fsspec

Vocabulary = list  # list[list[str]]: vocabulary[c] = names of class c, in label order
VocabularyLike = Union[str, Sequence[Union[str, Sequence[str]]]]


def _split_names(line: str) -> list[str]:
    return [name.strip() for name in line.split(",") if name.strip()]


def parse_vocabulary(text: str) -> list[list[str]]:
    """Parse ``"sky, cloud; road; car"`` into ``[["sky", "cloud"], ["road"], ["car"]]``."""
    classes = [_split_names(part) for part in text.split(";")]
    return normalize_vocabulary([c for c in classes if c])


def load_vocabulary(path: str, storage_options: dict | None = None) -> list[list[str]]:
    """Read a ``cls_*.txt`` file (local path or fsspec URL): one class per line, ", " synonyms."""
    with fsspec.open(path, "r", encoding="utf-8", **(storage_options or {})) as f:
        lines = f.read().splitlines()
    classes = [_split_names(line) for line in lines]
    return normalize_vocabulary([c for c in classes if c])


def normalize_vocabulary(vocabulary: VocabularyLike) -> list[list[str]]:
    """Accept a ``;``-string, a list of names, or a list of synonym lists; return synonym lists.

    Raises ``ValueError`` on an empty vocabulary or an empty class. A name may appear in several
    classes (the COCO-Object file lists "bed" both as a thing and among the background words); each
    occurrence is its own query.
    """
    if isinstance(vocabulary, str):
        return parse_vocabulary(vocabulary)
    out: list[list[str]] = []
    for i, entry in enumerate(vocabulary):
        names = [entry] if isinstance(entry, str) else list(entry)
        names = [str(n).strip() for n in names if str(n).strip()]
        if not names:
            raise ValueError(f"vocabulary class {i} has no name")
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
