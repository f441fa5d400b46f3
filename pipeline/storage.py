"""fsspec helpers for a long batch job: filesystems with patient retry defaults, whole-object
reads with retries, atomic writes, and credential redaction.

Credentials only travel inside ``storage_options`` dicts; anything that is logged or written
(run.json, summary.json, error rows) goes through :func:`redact` / :func:`scrub` first.
"""
from __future__ import annotations

import copy
import errno
import importlib
import json
import logging
import os
import posixpath
import re
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import fsspec
from fsspec.core import url_to_fs
from rfclip.decode import is_regular_file

log = logging.getLogger(__name__)
T = TypeVar("T")

# Object stores make a single PUT (or a completed multipart upload) visible all at once, so a
# write to the final key is already an atomic commit; everything else writes a temp name and renames.
OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss"}

# s3fs/botocore defaults (connect 5 s, read 15 s, 5 legacy attempts) are tuned for interactive use;
# a job that runs for hours against a busy bucket wants more patience. Users may override any key.
S3_LONG_JOB_DEFAULTS = {
    "config_kwargs": {
        "connect_timeout": 30,
        "read_timeout": 120,
        "retries": {"max_attempts": 10, "mode": "adaptive"},
    },
}

SECRET_KEY_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "session", "sas", "sig")
REDACTED = "***"


def protocol_of(uri: str) -> str:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for a local path."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return "file"


def with_retry_defaults(uri: str, storage_options: Optional[dict]) -> dict:
    """``storage_options`` merged over the long-job defaults for ``uri``'s protocol (user wins)."""
    so = copy.deepcopy(storage_options or {})
    if protocol_of(uri) in ("s3", "s3a"):
        merged = copy.deepcopy(S3_LONG_JOB_DEFAULTS)
        for k, v in so.items():
            if isinstance(v, dict) and isinstance(merged.get(k), dict):
                merged[k] = {**merged[k], **v}
            else:
                merged[k] = v
        return merged
    return so


def get_fs(uri: str, storage_options: Optional[dict] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path within it)`` for ``uri``, with :func:`with_retry_defaults` applied."""
    return url_to_fs(uri, **with_retry_defaults(uri, storage_options))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URI for ``path`` on ``fs`` that :func:`get_fs` resolves back (protocol kept, local stays a path)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def canonical_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` on ``fs`` spelled one way: no protocol, no trailing "/"; a local path absolute, with
    ``.``, ``..`` and ``//`` resolved (symlinks are not)."""
    path = fs._strip_protocol(path)
    if is_local(fs):
        path = posixpath.normpath(path)
    return path.rstrip("/") or "/"


def canonical_uri(uri: str, storage_options: Optional[dict] = None) -> str:
    """The one spelling of ``uri`` the job records and compares: ``./in/``, ``in`` and ``file:///abs/in``
    are all ``/abs/in``; ``s3a://b/k/`` is ``s3://b/k``."""
    fs, path = get_fs(uri, storage_options)
    return full_uri(fs, canonical_path(fs, path))


_TRANSIENT_WORDS = ("Timeout", "timed out", "Throttl", "SlowDown", "ServiceUnavailable", "InternalError",
                    "Connection reset", "EndpointConnectionError", "IncompleteRead")
# A 5xx status as botocore ("An error occurred (503)"), aiohttp ("503, message=") and HTTP lines spell it; a
# bare number is not enough, since messages quote keys such as "frame_0500.png".
_TRANSIENT_STATUS = re.compile(r"An error occurred \(50[0234]\)|\b50[0234], message=|\bHTTP(?:/[\d.]+)? 50[0234]\b"
                               r"|\bstatus(?: code)?[ :=]+50[0234]\b", re.IGNORECASE)


# errno values s3fs gives the S3 error codes of a busy or failing service (SlowDown, ServiceUnavailable,
# 503: EBUSY; InternalError, 500: EREMOTEIO), with the server's message as the text.
_TRANSIENT_ERRNOS = {errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.EAGAIN, errno.ETIMEDOUT,
                     errno.ECONNRESET}                                     # EREMOTEIO: Linux only


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying (timeouts, connection resets, throttling, 429 and 5xx).

    Looks at the exception and its causes (s3fs raises an ``OSError`` from botocore's ``ClientError``):
    the HTTP status where one is attached, else s3fs's errno, else the text.
    """
    seen = 0
    while exc is not None and seen < 4:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(exc, (TimeoutError, ConnectionError)):
            return True
        status = getattr(exc, "status", None)                              # aiohttp ClientResponseError
        response = getattr(exc, "response", None)                          # botocore ClientError
        if isinstance(response, dict):
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode", status)
        if isinstance(status, int):
            return status in (429, 500, 502, 503, 504)
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        name, text = type(exc).__name__, str(exc)
        if any(w in name or w in text for w in _TRANSIENT_WORDS) or _TRANSIENT_STATUS.search(text):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


class StorageError(OSError):
    """Storage that could not be read or written, retries spent: the job changed nothing it can't redo."""


def _client_errors() -> tuple:
    """The installed storage clients' own exception bases that are not OSErrors: botocore's (no
    credentials, an endpoint it can't connect to: s3fs turns only the S3 service's answers into OSErrors)
    and aiohttp's (fsspec's HTTP filesystem)."""
    found = []
    for module, name in (("botocore.exceptions", "BotoCoreError"), ("botocore.exceptions", "ClientError"),
                         ("aiohttp", "ClientError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


# What a storage operation raises when it fails: OSError and the storage clients' own errors. ``except
# STORAGE_ERRORS`` where a storage failure is to be reported in words.
STORAGE_ERRORS: tuple = (OSError, *_client_errors())


def storage_fault(exc: BaseException) -> bool:
    """Whether the failure to read a file is the storage's, not the file's: a transient error (retries spent:
    an outage, an endpoint it can't reach), missing credentials (botocore's NoCredentialsError and the
    like) or credentials S3 refuses (an unknown key, a wrong secret, an expired token). Any other failure
    is the file's (not found, no permission, an HTTP 403 or 410, a malformed URI)."""
    if is_transient(exc):
        return True
    seen = 0
    while exc is not None and seen < 4:
        response = getattr(exc, "response", None)                          # botocore ClientError
        code = ((response.get("Error") or {}).get("Code") if isinstance(response, dict) else None)
        if "Credential" in type(exc).__name__ or code in _CREDENTIAL_ERROR_CODES:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


# S3's answers about the request's credentials, whatever the object (s3fs makes them PermissionErrors, as
# it does AccessDenied, which may be one object's): every read with them fails alike.
_CREDENTIAL_ERROR_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                           "TokenRefreshRequired", "AuthorizationHeaderMalformed", "InvalidSecurity"}


def raise_storage_fault(uri: str, exc: BaseException) -> None:
    """Raise a :class:`StorageError` about ``uri`` from ``exc`` if it is a :func:`storage_fault`."""
    if storage_fault(exc):
        raise StorageError(f"can't read {scrub(uri)}, retries spent: {type(exc).__name__}: {scrub(str(exc))}") from exc


def retry_call(fn: Callable[[], T], what: str, attempts: int = 5, base_delay_s: float = 0.5,
               max_delay_s: float = 30.0) -> T:
    """Call ``fn()``; retry transient failures (:func:`is_transient`) with jittered exponential backoff.

    Non-transient errors and the last transient one propagate unchanged. On S3 this sits on top of
    botocore's own retries (``S3_LONG_JOB_DEFAULTS``: 10 adaptive attempts within one call, seconds
    apart): those ride out a throttled request, these an outage of a minute or so (delays up to 30 s).
    """
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if i == attempts - 1 or not is_transient(exc):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** i) * (0.5 + random.random())
            log.warning("transient storage error on %s (attempt %d/%d): %s; retrying in %.1fs",
                        what, i + 1, attempts, scrub(str(exc)), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_many(fs: fsspec.AbstractFileSystem, paths: list[str], attempts: int = 5,
              limit: Optional[int] = None) -> dict[str, Any]:
    """Read files, whole or their first ``limit`` bytes; returns ``{path: bytes | Exception}`` (one
    failure never hides the others).

    Uses ``fs.cat(paths, on_error="return")`` so async filesystems (s3fs) fetch concurrently, then
    retries each transient failure on its own with :func:`retry_call`. ``limit`` becomes a ranged
    read (an HTTP ``Range`` on object stores), so a huge file costs ``limit`` bytes, not its size.
    """
    if not paths:
        return {}
    out: dict[str, Any] = {}
    if is_local(fs):                     # a pipe or a device would block the read, or never end it
        for p in paths:
            if not is_regular_file(p):
                out[p] = OSError(errno.EINVAL, "not a regular file (a pipe, socket or device): not read", p)
        paths = [p for p in paths if p not in out]
    span = {} if limit is None else {"start": 0, "end": int(limit)}
    # fs.cat expands glob characters; names like "img[1].jpg" must be read literally with cat_file.
    plain = [p for p in paths if not any(c in p for c in "*?[")]
    try:
        got = fs.cat(plain, on_error="return", **span) if plain else {}
    except Exception as exc:  # noqa: BLE001 - the whole batch failed; each file is retried on its own
        got = {p: ConnectionError(f"batch read failed: {exc}") for p in plain}
    for p in paths:
        if p in plain:
            v = got.get(p, got.get(fs._strip_protocol(p), ConnectionError(f"no result returned for {p}")))
        else:
            v = ConnectionError("read literally")  # transient by construction: goes through cat_file below
        if isinstance(v, Exception) and is_transient(v):
            try:
                v = retry_call(lambda p=p: fs.cat_file(p, **span), f"read {p}", attempts=attempts)
            except Exception as exc:  # noqa: BLE001 - reported per file by the caller
                v = exc
        if span and isinstance(v, OSError) and not isinstance(v, (FileNotFoundError, PermissionError)):
            # An object store answers a range on an empty object with 416 (InvalidRange): say it is empty.
            try:
                v = b"" if fs.size(p) == 0 else v
            except Exception:  # noqa: BLE001 - keep the read's own error
                pass
        out[p] = v
    return out


def read_uris(uris: list[str], storage_options: Optional[dict] = None, limit: Optional[int] = None) -> list[Any]:
    """Bytes of each URI (at most ``limit`` of them), or the exception that reading it raised, in order.
    URIs are grouped by protocol and each group read with :func:`read_many`, so one batch may mix local
    paths and URLs (manifests)."""
    out: list[Any] = [None] * len(uris)
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(uris):
        groups.setdefault(u.split("://", 1)[0] if "://" in u else "file", []).append(i)
    for idxs in groups.values():
        fs, _ = get_fs(uris[idxs[0]], storage_options)
        paths = [fs._strip_protocol(uris[i]) for i in idxs]
        got = read_many(fs, paths, limit=limit)
        for i, p in zip(idxs, paths):
            out[i] = got[p]
    return out


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes, attempts: int = 5,
                       durable: bool = True) -> None:
    """Make ``path`` hold exactly ``data``, all at once or not at all.

    Object stores: one ``pipe_file`` (a single PUT or one completed multipart upload is atomic).
    Other filesystems: write ``.tmp-<uuid>-<name>`` in the same folder, then rename over ``path``.
    ``durable``: on a local disk, flush the data to the disk before the rename (``fsync``), so that even
    a power loss can't leave the name over no data. A killed process can't either way.
    """
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    parent = posixpath.dirname(path)
    if proto in OBJECT_STORE_PROTOCOLS:
        retry_call(lambda: fs.pipe_file(path, data), f"write {path}", attempts=attempts)
        return
    fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex[:12]}-{posixpath.basename(path)}")
    def write() -> None:
        if not is_local(fs):
            fs.pipe_file(tmp, data)
            return
        with open(tmp, "wb") as f:      # on disk before the rename, so a power loss can't leave the name over no data
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    try:
        retry_call(write, f"write {tmp}", attempts=attempts)
        if is_local(fs):
            os.replace(tmp, path)   # atomic; fs.mv (shutil.move) would put the file inside a folder named `path`
        else:
            fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def check_writable(uri: str, storage_options: Optional[dict] = None) -> list[str]:
    """Fail fast (``PermissionError`` with a clear message) if ``uri`` can't take a small write.

    Returns the folders this made on the way (outermost first; none on object stores), for
    :func:`remove_empty_folders` to take back if the run stops before writing anything.
    """
    fs, path = get_fs(uri, storage_options)
    probe = posixpath.join(path, f".write-probe-{uuid.uuid4().hex[:8]}")
    created: list[str] = []
    try:
        if protocol_of(uri) not in OBJECT_STORE_PROTOCOLS:
            folder = path.rstrip("/")
            while folder and not fs.exists(folder):
                created.insert(0, folder)
                parent = posixpath.dirname(folder)
                folder = "" if parent == folder else parent
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm(probe)
    except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
        remove_empty_folders(fs, created)
        raise PermissionError(f"output {uri!r} is not writable: {type(exc).__name__}: {scrub(str(exc))}") from exc
    return created


def remove_empty_folders(fs: fsspec.AbstractFileSystem, folders: list[str]) -> None:
    """Remove those of ``folders`` (outermost first) that are still empty, innermost first: a run that
    stopped before writing anything leaves no empty output folder behind."""
    for folder in reversed(folders):
        try:
            if fs.isdir(folder) and not fs.ls(folder, detail=False):
                fs.rmdir(folder)
        except OSError:
            return          # not empty after all, or gone: leave the rest


# --------------------------------------------------------------------------------------- secrets

_KNOWN_SECRETS: set[str] = set()


def _is_secret_key(key: str) -> bool:
    k = key.lower()
    if k in ("endpoint_url", "region_name", "anon", "use_ssl", "key_prefix"):
        return False
    return any(w in k for w in SECRET_KEY_WORDS)


def secret_values(obj: Any) -> set[str]:
    """All string values under secret-looking keys (key, secret, token, password, ...) of ``obj``."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and _is_secret_key(str(k)) and v:
                found.add(v)
            else:
                found |= secret_values(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found |= secret_values(v)
    return found


def register_secrets(storage_options: Optional[dict]) -> None:
    """Remember the secrets in ``storage_options`` so that :func:`scrub` removes them from any text."""
    _KNOWN_SECRETS.update(s for s in secret_values(storage_options or {}) if len(s) >= 4)


def register_url_secrets(*uris: Optional[str]) -> None:
    """Remember the credentials written into URLs so that :func:`scrub` removes them from any text: the
    password of ``https://user:password@host/...``, and a signed URL's query values under secret-looking
    keys (``X-Amz-Signature``, ``sig``, ``token``, ...), as written and decoded
    (``rfclip.weights.url_secrets``). Not the user name, nor other query values: those may be words that
    other text holds too."""
    from rfclip.weights import url_secrets

    for uri in uris:
        if uri and "://" in uri:
            _KNOWN_SECRETS.update(url_secrets(uri, _is_secret_key))


def redact(obj: Any) -> Any:
    """A deep copy of ``obj`` with values under secret-looking keys replaced by ``"***"``."""
    if isinstance(obj, dict):
        return {k: (REDACTED if _is_secret_key(str(k)) and isinstance(v, str) and v else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return scrub(obj)
    return obj


def scrub(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` with every registered (and ``extra``) secret value replaced by ``"***"``."""
    for s in sorted(set(_KNOWN_SECRETS) | set(extra), key=len, reverse=True):
        if s and s in text:
            text = text.replace(s, REDACTED)
    return text


class ScrubbingFormatter(logging.Formatter):
    """A log formatter that scrubs registered secrets from the whole formatted record (message,
    traceback, stack). The record itself is left as it is for any other handler."""

    def format(self, record: logging.LogRecord) -> str:  # noqa: A003 - logging API name
        return scrub(super().format(record))


_LOG_HANDLER: Optional[logging.Handler] = None


def setup_logging() -> None:
    """INFO logs to the current stderr, secrets scrubbed, for the job CLIs. Idempotent: a repeated call
    (jobs/evaluate.py, tests) replaces the handler instead of stacking one bound to an old stream."""
    global _LOG_HANDLER
    root = logging.getLogger()
    if _LOG_HANDLER is not None:
        root.removeHandler(_LOG_HANDLER)
    _LOG_HANDLER = logging.StreamHandler(sys.stderr)
    _LOG_HANDLER.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _LOG_HANDLER.addFilter(_not_open_clip_info)
    root.addHandler(_LOG_HANDLER)
    root.setLevel(logging.INFO)


def _not_open_clip_info(record: logging.LogRecord) -> bool:
    """False for open_clip's INFO lines (it logs each tokenizer lookup to the root logger, three lines per
    model built); its warnings and errors pass."""
    return record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in record.pathname


def storage_options_arg(text: Optional[str]) -> Optional[dict]:
    """A CLI's ``--storage-options``: JSON, or ``@path`` to a JSON file (keeps secrets off the command line
    and out of job listings); without it, ``$RFCLIP_STORAGE_OPTIONS`` (either form); else None."""
    text = text or os.environ.get("RFCLIP_STORAGE_OPTIONS")
    if not text:
        return None
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    so = json.loads(text)
    if not isinstance(so, dict):
        raise ValueError("--storage-options must be a JSON object")
    return so
