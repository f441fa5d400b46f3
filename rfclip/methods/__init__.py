"""Name-to-class registry of the dense methods."""
from __future__ import annotations

from ..settings import Settings
from ..vit import DenseViT
from .base import DenseMethod, DenseOutput
from .baselines import ClearCLIP, MaskCLIP, NACLIP, SCLIP, VanillaCLIP
from .release import RFCLIPRelease
from .rfclip import RFCLIP

METHODS: dict[str, type[DenseMethod]] = {
    cls.name: cls for cls in (VanillaCLIP, MaskCLIP, SCLIP, ClearCLIP, NACLIP, RFCLIP, RFCLIPRelease)
}


def available_methods() -> list[str]:
    """Names accepted by ``Segmenter(method=...)``."""
    return list(METHODS)


def build_method(name: str, vit: DenseViT, settings: Settings, arch: str) -> DenseMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    return METHODS[name](vit, settings, arch)


__all__ = ["DenseMethod", "DenseOutput", "METHODS", "available_methods", "build_method"]
