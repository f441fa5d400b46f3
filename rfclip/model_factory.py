"""Building the open_clip model and loading verified weights into it: one entry point, :func:`load_clip`.

``rfclip.weights`` finds the file and checks it; this module registers the architecture (a built-in
name or a model-config JSON), reads the file's tensors and decides the activation and image
normalisation the model is built with.

State dicts are read with ``torch.load(weights_only=True)`` or safetensors: no arbitrary objects are
unpickled. OpenAI's TorchScript archives are read with ``torch.jit.load``, which deserialises
TorchScript code and tensors in C++ (no Python pickle of arbitrary classes), and only their
``state_dict`` is kept.

Why not ``open_clip.load_checkpoint``: it reads the open_clip layout but not OpenAI's TorchScript
archives (its ``load_openai_model`` builds its own model around them). Here one path reads all three
formats into the model open_clip built and says what failed.
"""
from __future__ import annotations

import contextlib
import json
import os
import logging
import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional

import open_clip
import torch

from .weights import (OPENAI_MEAN, OPENAI_STD, ResolvedWeights, WeightsError, is_torchscript,
                      resolve_weights, tag_config)

# Extra entries of OpenAI's TorchScript state dicts that are not parameters of the model.
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

_BUILT_IN_ARCHS = frozenset(open_clip.list_models())       # before any config of ours is registered


def register_model(model: str) -> str:
    """Return an open_clip architecture name for ``model``.

    ``model`` is a built-in name (``"ViT-B-16"``; ``"ViT-B/16"`` is accepted) or the path of an
    open_clip model-config JSON (``{"embed_dim", "vision_cfg", "text_cfg"}``), which is registered
    under the file's stem. The JSON form serves custom and tiny test architectures.
    """
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model:
        raise TypeError(f"model is an open_clip architecture name or the path of a model-config .json, not {model!r}")
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model config {model} does not exist")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"model config {model} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"{model} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        if path.stem in _BUILT_IN_ARCHS and open_clip.get_model_config(path.stem) != cfg:
            # open_clip registers a config under its file's stem: this one would replace the built-in
            # architecture for the whole process, and its distraction dims and tags would name the wrong model.
            raise ValueError(f"model config {model} is named like open_clip's built-in {path.stem} but differs "
                             f"from it; rename the file")
        open_clip.add_model_config(path)
        return path.stem
    name = model.replace("/", "-")
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {model!r}; known ViTs include "
                         f"{[m for m in open_clip.list_models() if m.startswith('ViT-')][:12]} ...")
    return name




def _unstated_choices(arch: str, resolved: ResolvedWeights) -> Optional[str]:
    """For a file that is not a known OpenAI checkpoint: a warning naming the open_clip tags of ``arch``
    whose weights need QuickGELU or another image normalisation than the one assumed, else None."""
    from open_clip.pretrained import list_pretrained_tags_by_model

    if resolved.kind == "tag" or resolved.openai or resolved.quick_gelu:
        return None
    cfgs = {t: tag_config(arch, t) for t in list_pretrained_tags_by_model(arch)}
    quick = [t for t, c in cfgs.items() if c.get("quick_gelu") and t != "openai"]
    other_norm = [t for t, c in cfgs.items() if tuple(c.get("mean", OPENAI_MEAN)) != tuple(resolved.mean)]
    if not quick and not other_norm:
        return None
    said = [f"weights {resolved.spec} are not a known OpenAI checkpoint, so the model assumes GELU and the "
            f"image mean/std {resolved.mean}/{resolved.std}."]
    if quick:
        said.append(f"Weights trained with QuickGELU (OpenAI's, and {arch} tags {quick}) need quick_gelu=True "
                    f"(CLI: --quick-gelu).")
    if other_norm:
        said.append(f"The {arch} tags {other_norm} were trained with another mean/std: pass image_mean= and "
                    f"image_std= (CLI: --image-mean R,G,B --image-std R,G,B).")
    said.append("Passing quick_gelu (True or False), image_mean or image_std silences this warning.")
    return " ".join(said)




def _misfit(weights: dict, model: dict, examples: int = 2) -> str:
    """What keeps the state dict ``weights`` from loading into one shaped like ``model`` (name -> tensor
    both): counts of the tensors missing, left over and of other shapes, with a few names; "" if none."""
    def some(names: list[str]) -> str:
        return ", ".join(names[:examples]) + (", ..." if len(names) > examples else "")

    missing = [k for k in model if k not in weights]
    extra = [k for k in weights if k not in model]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(model[k].shape)}" for k in model
              if k in weights and not _fits(weights[k], model[k])]
    said = [f"{len(missing)} of the model's tensors missing: {some(missing)}" if missing else "",
            f"{len(extra)} tensors it has no place for: {some(extra)}" if extra else "",
            f"{len(shapes)} of other shapes: {some(shapes)}" if shapes else ""]
    return "; ".join(x for x in said if x)


def _fits(value, param) -> bool:
    """Whether PyTorch's strict ``load_state_dict`` takes ``value`` for ``param``: the same shape, or a 1-D
    tensor for a 0-dim one (it takes the first element). Values without a shape are left to it to judge."""
    shape = getattr(value, "shape", None)
    return shape is None or tuple(shape) == tuple(param.shape) or (param.dim() == 0 and len(shape) == 1)


def rgb_values(name: str, value, default: tuple = (), positive: bool = False) -> tuple:
    """``value`` (3 numbers, or a ``"R,G,B"`` string) as 3 finite floats, one per RGB channel; ``default``
    when None. ``ValueError`` names ``name`` otherwise."""
    if value is None:
        return tuple(float(v) for v in default)
    try:
        out = tuple(float(v) for v in (value.split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 numbers (R, G, B), got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out) or (positive and min(out) <= 0):
        raise ValueError(f"{name} must be 3 finite numbers (R, G, B){', all > 0' if positive else ''}, got {value!r}")
    return out




def _torch_load_reason(exc: Exception) -> str:
    """The cause in torch.load's error, without its advice to unpickle with weights_only=False."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line.split(". ", 1)[0].rstrip(".")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, without unpickling arbitrary objects (module docstring)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            sd = load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends, said with the file's name
            raise WeightsError(f"{path} is not a readable .safetensors file: {type(e).__name__}: {e}") from e
    elif is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, the files are not
            sd = torch.jit.load(path, map_location="cpu").state_dict()
        sd = {k: v for k, v in sd.items() if k not in _JIT_EXTRA_KEYS}
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"{path} is not a readable checkpoint: {_torch_load_reason(e)}. rfclip reads "
                               f"tensors only (torch.load with weights_only=True) and never unpickles code; "
                               f"re-save the state dict (or use .safetensors)") from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise WeightsError(f"{path} does not hold a state dict")
        sd = {k: v for k, v in sd.items() if k not in _JIT_EXTRA_KEYS}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd




def load_clip(model: str, weights: str, weights_sha256: Optional[str] = None,
              storage_options: Optional[dict] = None, cache_dir: Optional[str] = None,
              quick_gelu: Optional[bool] = None, image_mean: Optional[tuple] = None,
              image_std: Optional[tuple] = None):
    """Build the open_clip model and load verified weights into it.

    Returns ``(clip_model, tokenizer, arch_name, ResolvedWeights)``; the model is float32, on the
    CPU, in eval mode. ``ResolvedWeights.quick_gelu`` is the activation the model was built with and
    ``mean``/``std`` the image normalisation to use: each as given here, else inferred from the weights.
    A file that could need other choices than the inferred ones (its architecture has open_clip tags
    trained with QuickGELU or another normalisation) gets a warning that names them, unless the
    caller gave any of the three.
    """
    from .warn import warn
    from open_clip.factory import resize_pos_embed

    arch = register_model(model)
    resolved = resolve_weights(arch, weights, weights_sha256, storage_options, cache_dir)
    # The activation the model is built with is what config() and the text cache key record. An
    # architecture whose config says QuickGELU (``*-quickgelu``) has it whatever force_quick_gelu says.
    built_in = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    if built_in and quick_gelu is False:
        raise ValueError(f"{arch} is built with QuickGELU; quick_gelu=False can't turn it off (use the "
                         f"architecture without -quickgelu)")
    if quick_gelu is None and image_mean is None and image_std is None and not built_in:
        message = _unstated_choices(arch, resolved)
        if message:
            warn(message, UserWarning)
    use_quick_gelu = built_in or (resolved.quick_gelu if quick_gelu is None else bool(quick_gelu))
    resolved = replace(resolved, quick_gelu=use_quick_gelu,
                       mean=rgb_values("image_mean", image_mean, resolved.mean),
                       std=rgb_values("image_std", image_std, resolved.std, positive=True))
    if max(resolved.mean) > 1 or min(resolved.mean) < 0 or max(resolved.std) > 1:
        raise ValueError(f"image_mean {resolved.mean} and image_std {resolved.std} are on a 0-1 scale (OpenAI's: "
                         f"{OPENAI_MEAN}, {OPENAI_STD}); values on a 0-255 scale divided by 255 give them")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "no pretrained weights" here; we load them next
    try:
        clip = open_clip.create_model(arch, pretrained=None, force_quick_gelu=use_quick_gelu)
    finally:
        root.setLevel(level)
    try:
        sd = read_state_dict(resolved.path)
    except WeightsError as e:
        if resolved.kind != "url" or weights_sha256 is not None:
            raise
        # Unverified, what the URL gave is no checkpoint (an HTML page, a cut-off file): its cached copy goes,
        # so the next run fetches the URL again instead of failing on the copy. (Verified weights are what
        # was asked for: a fetch would give them again.)
        with contextlib.suppress(FileNotFoundError):        # another process on this machine removed it
            os.remove(resolved.path)
        raise WeightsError(f"{e}; it came from {resolved.spec}, and its cached copy is removed") from e
    if "logit_scale" in sd and sd["logit_scale"].ndim != clip.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(clip.logit_scale.shape)
    if getattr(clip, "logit_bias", None) is None:
        sd.pop("logit_bias", None)
    resize_pos_embed(sd, clip)
    misfit = _misfit(sd, clip.state_dict())
    if misfit:
        raise WeightsError(f"{resolved.spec} does not fit architecture {arch} ({misfit}). Weights saved from another "
                           f"architecture need that one: pass model= (CLI: --model) its open_clip name, such as "
                           f"ViT-L-14, or the model-config .json it was built from")
    try:
        clip.load_state_dict(sd, strict=True)
    except RuntimeError as e:                    # what _misfit does not look at (a value that is not a tensor)
        raise WeightsError(f"{resolved.spec} does not fit architecture {arch}: {str(e)[:600]}") from e
    clip.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    return clip, tokenizer, arch, resolved
