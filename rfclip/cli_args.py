"""Command-line options shared by the tools: model, weights and method settings."""
from __future__ import annotations

import argparse
import json

from .settings import SETTING_NAMES


def add_model_arguments(parser: argparse.ArgumentParser, default_method: str = "rfclip") -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="ViT-B-16", help="open_clip architecture or model-config JSON (default ViT-B-16)")
    g.add_argument("--weights", default="openai",
                   help="open_clip tag, local .pt/.safetensors file, or fsspec URL (default: openai)")
    g.add_argument("--weights-sha256", default=None, help="expected sha256 of the weights file")
    g.add_argument("--method", default=default_method, help=f"method (default {default_method})")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"])
    g.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                   help=f"any method setting, JSON-parsed value; repeatable. Names: {', '.join(SETTING_NAMES)}")


def parse_settings(pairs: list[str], precision: str | None = None) -> dict:
    """``["lam=0.6", "distraction_dims=[1,2]"]`` -> ``{"lam": 0.6, "distraction_dims": [1, 2]}``."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--setting expects NAME=VALUE, got {pair!r}")
        name, raw = pair.split("=", 1)
        name = name.strip().replace("-", "_")
        if name not in SETTING_NAMES:
            raise SystemExit(f"unknown setting {name!r}; settings are: {', '.join(SETTING_NAMES)}")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    if precision:
        out["precision"] = precision
    return out
