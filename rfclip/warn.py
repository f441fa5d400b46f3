"""Warnings attributed to the user's line of code, not to a frame inside rfclip or torch."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` with the stack level of the first caller outside rfclip and torch (the depth
    varies: ``predict_batch``, ``encode_dense``, torch's ``inference_mode`` wrappers...)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


@contextlib.contextmanager
def as_cli_lines():
    """Within it, a warning prints as one ``warning: ...`` line on stderr: a command-line tool's user has
    no line of code of their own for it to point at (it would name ``<frozen runpy>``)."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
        yield
