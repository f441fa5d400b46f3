"""Command-line options shared by the tools: model, weights and method settings."""
from __future__ import annotations

import argparse
import json

from .settings import SETTING_NAMES, coerce_setting


def add_model_arguments(parser: argparse.ArgumentParser, default_method: str = "rfclip", *, method: bool = True,
                        device: bool = True):
    """The model flags every tool shares, in a "model" group (returned, for a tool's own extra flags):
    ``--model``, ``--weights``, ``--weights-sha256``, the weights choices, ``--method`` (unless
    ``method=False``), ``--device`` (unless ``device=False``: the jobs place their workers), ``--precision``
    and ``--setting``. Defaults are shown by :class:`DefaultsHelpFormatter`."""
    from .methods import available_methods

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="ViT-B-16", help="open_clip architecture, or a model-config JSON")
    g.add_argument("--weights", default="openai", help="open_clip tag, local .pt/.safetensors file, or fsspec URL")
    g.add_argument("--weights-sha256", default=None, help="refuse weights with another sha256")
    add_weights_choices(g)
    if method:
        g.add_argument("--method", default=default_method, help=", ".join(available_methods()))
    if device:
        g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"], help="default: the method's (fp32)")
    g.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE", type=parse_setting,
                   help=f"any method setting, JSON-parsed value; repeatable. Names: {', '.join(SETTING_NAMES)}")
    return g


def add_weights_choices(group) -> None:
    """``--quick-gelu/--no-quick-gelu``, ``--image-mean``, ``--image-std``: what a weights file does not
    say about itself (a tag's open_clip config and OpenAI's files do; see ``rfclip.model_factory.load_clip``)."""
    group.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                       help="build the model with QuickGELU (default: inferred from the weights)")
    group.add_argument("--image-mean", type=rgb_triple, default=None, metavar="R,G,B",
                       help="input normalisation mean, 0-1 scale (default: the tag's, else OpenAI's)")
    group.add_argument("--image-std", type=rgb_triple, default=None, metavar="R,G,B",
                       help="input normalisation std, 0-1 scale (default: the tag's, else OpenAI's)")


def positive_int(text: str) -> int:
    """An argparse ``type=`` for counts: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse ``type=`` for resource amounts: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def rgb_triple(text: str) -> tuple[float, float, float]:
    """``"0.5,0.5,0.5"`` -> ``(0.5, 0.5, 0.5)``; an argparse ``type=`` (positivity is checked where the
    value is used, as for the library's arguments)."""
    from .model_factory import rgb_values

    try:
        return rgb_values("the value", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_setting(text: str) -> tuple[str, object]:
    """``"lam=0.6"`` -> ``("lam", 0.6)``: the value is JSON when it parses, else the raw string, then
    checked against the setting's type (``rfclip.settings.coerce_setting``: ``pamr=off`` is False).

    Usable as an argparse ``type=``; an unknown name, a missing ``=`` or a value of the wrong type is
    an argparse error.
    """
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--setting expects NAME=VALUE, got {text!r}")
    name, raw = text.split("=", 1)
    name = name.strip().replace("-", "_")
    if name not in SETTING_NAMES:
        raise argparse.ArgumentTypeError(f"unknown setting {name!r}; settings are: {', '.join(SETTING_NAMES)}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    try:
        return name, coerce_setting(name, value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_settings(pairs: list[tuple[str, object]], precision: str | None = None) -> dict:
    """Parsed ``--setting`` pairs (and ``--precision``) as Segmenter keyword arguments."""
    out = dict(pairs)
    if precision:
        out["precision"] = precision
    return out


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every flag's default: the ones with a value (not None, False or []) get
    ``(default: X)``, and flags without help text get one too, so none is left out."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in help_text:
            return help_text
        return (help_text + " " if help_text else "") + "(default: %(default)s)"

