"""Listing the files below a local folder, following links to folders once, for every tool that walks one.

``rfclip-segment`` and the Ray job's lister (``pipeline.sources``) both list input folders with
:func:`local_files`, so they follow the same links and leave out the same folders.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

# Why a folder is not walked, as :func:`local_files` tells ``on_skip``.
OUTPUT = "it is the output"


def local_files(folder: str, skip: Optional[str] = None,
                on_skip: Optional[Callable[[str, str, str], None]] = None,
                on_error: Optional[Callable[[OSError], None]] = None) -> list[str]:
    """Every file below the local ``folder`` (its path as the walk reaches it), each folder's in sorted order.

    Links to folders are followed, each real folder once. Not followed: a link to ``folder`` or to a
    folder that holds it, a link to a folder inside ``folder`` (listed by its own path), a folder already
    listed (a cycle, a second link), and the folder ``skip`` (matched by real path, however the walk
    reaches it). ``on_skip(path, real_path, why)`` hears of each (``why`` is :data:`OUTPUT` for ``skip``),
    ``on_error(OSError)`` of each folder that can't be read (``os.walk``'s ``onerror``).
    """
    root = os.path.realpath(folder)
    skip_real = os.path.realpath(skip) if skip else None
    seen, files = {root}, []
    for parent, folders, names in os.walk(folder, followlinks=True, onerror=on_error):
        followed = []
        for name in sorted(folders):
            sub = os.path.join(parent, name)
            real = os.path.realpath(sub)
            why = (OUTPUT if real == skip_real
                   else "it is the input folder or holds it" if within(root, real)
                   else "it is inside the input folder" if os.path.islink(sub) and within(real, root)
                   else "that folder is listed already (a cycle, or a second link to it)" if real in seen
                   else None)
            if why is not None:
                if on_skip is not None:
                    on_skip(sub, real, why)
                continue
            seen.add(real)
            followed.append(name)
        folders[:] = followed
        files += [os.path.join(parent, n) for n in sorted(names)]
    return files


def within(path: str, folder: str) -> bool:
    """Whether the real path ``path`` is ``folder`` or lies below it (``/`` holds everything)."""
    return os.path.commonpath([path, folder]) == folder
