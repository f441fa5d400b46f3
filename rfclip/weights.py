"""Finding and verifying CLIP weights: a local file, a cached copy of a URL, or an open_clip tag.

``rfclip.model_factory`` reads them into the open_clip model; this module says where they are, checks
their sha256, and what they were trained with (QuickGELU, image mean/std).

``weights`` may be:

- an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``, ...): downloaded and cached by
  open_clip when online. When the file is not cached and the hub cannot be reached, this fails within
  seconds (not after open_clip's retries) with a message that says to pass ``weights=PATH``;
- a local file: an OpenAI TorchScript archive (``ViT-B-16.pt``), a state dict (``.pt``, ``.pth``,
  ``.bin``, the OpenAI or open_clip key layout, optionally under ``"state_dict"``) or ``.safetensors``;
- any fsspec URL (``s3://bucket/ViT-B-16.pt``, ``gs://``, ``https://``...): streamed once into a
  local cache, then loaded as a local file.

Why not fsspec's ``filecache::``: it verifies no sha256 and can't tell an unreachable host from a
missing file; here a URL is streamed once into the cache, its digest checked, and a failure says which.
"""
from __future__ import annotations

import hashlib
import os
import socket
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import quote, unquote, unquote_plus, urlparse, urlsplit, urlunsplit

import fsspec

# sha256 of OpenAI's released checkpoints (METHODS.md §6). A file with one of these digests is an
# OpenAI model, which was trained with QuickGELU.
OPENAI_SHA256 = {
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f": "ViT-B-16",
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af": "ViT-B-32",
    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836": "ViT-L-14",
}
LOCAL_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# The image normalisation OpenAI's models were trained with, and most open_clip tags keep.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class WeightsError(RuntimeError):
    """The weights could not be found, fetched, verified or loaded."""


class WeightsUnavailableError(WeightsError):
    """A pretrained tag is not cached and cannot be downloaded (offline)."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Where the weights came from and what they are.

    Attributes:
        spec: what the user passed (a tag, a path or a URL; never credentials).
        kind: ``"tag"``, ``"file"`` or ``"url"``.
        path: the local file that was loaded.
        sha256: hex digest of that file.
        quick_gelu: whether the model was built with QuickGELU (OpenAI weights, and the open_clip tags
            whose pretrained config says so: MetaCLIP, DFN, ...).
        mean, std: the per-channel image normalisation the weights were trained with (RGB, 0-1 scale):
            the tag's pretrained config, else OpenAI's.
        openai: whether these are OpenAI's weights: the tag ``"openai"``, a file with one of
            :data:`OPENAI_SHA256`'s digests, or a file in OpenAI's TorchScript format. RF-CLIP's known
            distraction dimensions were found on them (METHODS.md §3a).
    """

    spec: str
    kind: str
    path: str
    sha256: str
    quick_gelu: bool
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    openai: bool = False


def cache_root() -> Path:
    """``$RFCLIP_CACHE`` or ``~/.cache/rfclip``."""
    return Path(os.environ.get("RFCLIP_CACHE", Path.home() / ".cache" / "rfclip"))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a local file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_url(spec: str) -> bool:
    scheme = urlparse(spec).scheme
    return len(scheme) > 1 and scheme != "file"


def _local_path(spec: str) -> str:
    """``file:///x/y.pt`` -> ``/x/y.pt`` and ``~/y.pt`` -> ``/home/me/y.pt``; anything else as given."""
    if urlparse(spec).scheme == "file":
        return unquote(urlparse(spec).path)
    return os.path.expanduser(spec)


def _is_tag(model: str, spec: str) -> bool:
    """True if ``spec`` is an open_clip pretrained tag of ``model``."""
    return bool(tag_config(model, spec))


def _unreachable(host: str, scheme: str = "https", port: Optional[int] = None, use_proxy: bool = True,
                 timeout: float = 3.0) -> Optional[str]:
    """Why ``scheme://host:port`` can't be reached, or None if a TCP connection opens to a proxy from
    ``$HTTPS_PROXY`` / ``$HTTP_PROXY`` / ``$ALL_PROXY`` (with ``use_proxy``) or to the host. Any route
    counts: HTTP clients differ in which variables they read and how they read ``$NO_PROXY``, so this
    check does not guess which route the download takes; it only fails fast when none can work.
    Proxies are tried first (a proxied machine may wait long on DNS for the host), and named by host
    and port only, never with their credentials."""
    routes, bad = [], []
    proxies = urllib.request.getproxies() if use_proxy else {}
    for proxy in dict.fromkeys(p for p in (proxies.get(scheme), proxies.get("all")) if p):
        u = urlparse(proxy if "://" in proxy else "http://" + proxy)
        try:
            routes.append((u.hostname or "", u.port or (443 if u.scheme == "https" else 80)))
        except ValueError:                                     # e.g. a port that is not a number
            bad.append(f"a proxy setting that is not a valid URL (host {u.hostname})")
    routes.append((host, port or (443 if scheme == "https" else 80)))
    failures = []
    for i, (target_host, target_port) in enumerate(routes):
        try:
            with socket.create_connection((target_host, target_port), timeout=timeout):
                return None
        except OSError as e:
            name = host if i == len(routes) - 1 else f"the proxy {target_host}:{target_port}"
            failures.append(f"{name} ({e.strerror or e})")
    return "can't connect to " + " nor ".join(failures + bad)


def _offline_message(model: str, tag: str, reason: str) -> str:
    return (f"pretrained weights {model}/{tag!r} are not cached and cannot be downloaded ({reason}). "
            f"Pass weights=PATH (CLI: --weights PATH) with a local .pt/.safetensors file or an fsspec URL "
            f"such as s3://bucket/ViT-B-16.pt; OpenAI's ViT-B/16 file has sha256 "
            f"5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f. To try the tools without "
            f"weights, `python -m rfclip.random_model DIR` writes a random model (its masks mean nothing) "
            f"and prints the flags to use.")


def _resolve_tag(model: str, tag: str, cache_dir: Optional[str]) -> str:
    """Local path of an open_clip pretrained tag's file, downloading it if online."""
    from open_clip.pretrained import download_pretrained, list_pretrained_tags_by_model

    cfg = tag_config(model, tag)
    if not cfg:
        raise WeightsError(f"{tag!r} is neither a file nor an open_clip pretrained tag for {model}; "
                           f"tags for {model}: {list_pretrained_tags_by_model(model)}")
    cached = _cached_tag_file(cfg, cache_dir)
    if cached:
        return cached
    hub_host = "huggingface.co"
    url = cfg.get("url", "")
    host = hub_host if cfg.get("hf_hub") else urlparse(url).hostname
    if os.environ.get("HF_HUB_OFFLINE") == "1" and cfg.get("hf_hub"):
        raise WeightsUnavailableError(_offline_message(model, tag, "HF_HUB_OFFLINE=1"))
    why = _unreachable(host) if host else "the tag has no download address"
    if why:
        raise WeightsUnavailableError(_offline_message(model, tag, why))
    try:
        return download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - re-raised with the actionable message
        raise WeightsUnavailableError(_offline_message(model, tag, f"download failed: {e}")) from e


def _cached_tag_file(cfg: dict, cache_dir: Optional[str]) -> Optional[str]:
    hf = cfg.get("hf_hub", "")
    if hf:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        repo, filename = os.path.split(hf)
        for fname in ([filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
            hit = try_to_load_from_cache(repo, fname, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
        return None
    url = cfg.get("url", "")
    if url:
        path = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        return str(path) if path.is_file() else None
    return None


def _http_status(exc: BaseException) -> Optional[int]:
    """The HTTP status behind an fsspec error (its HTTP filesystem reports most failures as not found)."""
    seen = 0
    while exc is not None and seen < 8:
        status = getattr(exc, "status", None)
        if isinstance(status, int):
            return status
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def public_spec(spec: str) -> str:
    """``spec`` as it may be shown and recorded: a URL's user info and query string (a password, a signed
    URL's signature or token) become ``***``; anything else as given."""
    if not _is_url(spec):
        return spec
    parts = urlsplit(spec)
    netloc = parts.netloc if "@" not in parts.netloc else "***@" + parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", parts.fragment))


def url_secrets(url: str, secret_key=lambda key: True) -> set[str]:
    """What in ``url`` may be a credential: its password, and its query values whose key ``secret_key``
    accepts (all, by default), each as written and decoded; those of 4 characters or more."""
    parts = urlsplit(url)
    found = {parts.password or "", unquote(parts.password or "")}
    for pair in parts.query.split("&"):
        key, _, raw = pair.partition("=")
        if secret_key(unquote_plus(key)):
            value = unquote_plus(raw)
            found |= {raw, value, quote(value, safe=""), quote(value)}
    return {s for s in found if len(s) >= 4}


def _fetch_url(url: str, expected_sha256: Optional[str], storage_options: Optional[dict]) -> str:
    """Stream a remote file into the cache once; return its local path."""
    shown = public_spec(url)
    secrets = url_secrets(url)

    def said(e: BaseException) -> str:
        """``e``'s text without the URL's credentials (HTTP errors quote the URL, as typed or decoded)."""
        text = str(e).replace(url, shown)
        for secret in sorted(secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache_root() / "weights" / key / (os.path.basename(urlparse(url).path) or "weights.bin")
    if target.is_file() and (expected_sha256 is None or file_sha256(target) == expected_sha256):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".part-{os.getpid()}")
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        os.replace(tmp, target)
    except FileNotFoundError as e:
        # fsspec's HTTP filesystem says "not found" for a host it can't reach, too.
        parsed = urlparse(url)
        # fsspec's HTTP client goes through $HTTPS_PROXY only when asked to (client_kwargs trust_env).
        trust_env = bool(((storage_options or {}).get("client_kwargs") or {}).get("trust_env"))
        why = (_unreachable(parsed.hostname, parsed.scheme, parsed.port, use_proxy=trust_env)
               if parsed.scheme in ("http", "https") and parsed.hostname else None)
        if why:
            raise WeightsUnavailableError(f"can't fetch weights URL {shown} ({why}; offline?); pass weights=PATH "
                                          f"with a local copy") from e
        status = _http_status(e) if parsed.scheme in ("http", "https") else 404
        if status != 404:           # a proxy's 502, a 403, or a connection that failed: not a missing file
            cause = e.__cause__ or e
            answer = f"the server answered HTTP {status}" if status else f"{type(cause).__name__}: {said(cause)}"
            raise WeightsUnavailableError(f"can't fetch weights URL {shown} ({answer}); pass weights=PATH with a "
                                          f"local copy") from e
        raise WeightsError(f"weights URL {shown} does not exist") from e
    except OSError as e:
        raise WeightsError(f"can't read weights URL {shown}: {type(e).__name__}: {said(e)}") from e
    except (ImportError, ValueError) as e:     # fsspec: a protocol it does not know, or whose package is missing
        raise WeightsError(f"can't read weights URL {shown}: {said(e)}") from e
    except Exception as e:  # noqa: BLE001 - a storage client's own error (botocore: no credentials, no endpoint)
        raise WeightsUnavailableError(f"can't fetch weights URL {shown} ({type(e).__name__}: {said(e)}); check the "
                                      f"storage's credentials and endpoint (storage_options=; for s3:// also the "
                                      f"AWS_* environment variables), or pass weights=PATH with a local copy") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(target)


def resolve_weights(model: str, weights: str, weights_sha256: Optional[str] = None,
                    storage_options: Optional[dict] = None, cache_dir: Optional[str] = None) -> ResolvedWeights:
    """Find the weights file for ``weights`` and verify it; see the module docstring."""
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if not isinstance(weights, str) or not weights:
        raise TypeError(f"weights is an open_clip tag, a file path or a URL, not {weights!r}")
    if weights_sha256 is not None:
        if not isinstance(weights_sha256, str):
            raise TypeError(f"weights_sha256 is a string of 64 hex digits, not {weights_sha256!r}")
        weights_sha256 = weights_sha256.strip().lower()
        if len(weights_sha256) != 64 or any(c not in "0123456789abcdef" for c in weights_sha256):
            raise ValueError(f"weights_sha256 must be 64 hex digits, got {weights_sha256!r}")
    local = _local_path(weights)
    if _is_url(weights):
        kind, path = "url", _fetch_url(weights, weights_sha256, storage_options)
    elif (os.path.isfile(local) or local.endswith(LOCAL_SUFFIXES) or os.sep in local or local != weights
          or (os.path.exists(local) and not _is_tag(model, weights))):   # a folder ./openai is not the tag
        if os.path.isdir(local):
            raise WeightsError(f"weights {weights} is a directory; pass the checkpoint file inside it")
        if not os.path.isfile(local):
            raise FileNotFoundError(f"weights file {weights} does not exist")
        kind, path = "file", local
    else:
        kind, path = "tag", _resolve_tag(model, weights, cache_dir)
    digest = file_sha256(path)
    if weights_sha256 is not None and digest != weights_sha256:
        raise WeightsError(f"sha256 mismatch for {public_spec(weights)}: expected {weights_sha256}, file has {digest}")
    # A tag's pretrained config says what its weights were trained with; a file says nothing, unless it
    # is one of OpenAI's (by digest or by its TorchScript format).
    tag_cfg = tag_config(model, weights) if kind == "tag" else {}
    openai = (kind == "tag" and weights == "openai") or digest in OPENAI_SHA256 or is_torchscript(path)
    quick_gelu = model.endswith("-quickgelu") or bool(tag_cfg.get("quick_gelu", False)) or openai
    return ResolvedWeights(spec=public_spec(weights), kind=kind, path=path, sha256=digest, quick_gelu=quick_gelu,
                           mean=tuple(tag_cfg.get("mean", OPENAI_MEAN)), std=tuple(tag_cfg.get("std", OPENAI_STD)),
                           openai=openai)


def tag_config(model: str, tag: str) -> dict:
    """open_clip's pretrained config of ``model``'s tag ``tag`` (``quick_gelu``, ``mean``, ``std``, ...), or {}."""
    from open_clip.pretrained import get_pretrained_cfg

    return get_pretrained_cfg(model, tag) or {}


def is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with a ``code/`` folder), as OpenAI's files are."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
