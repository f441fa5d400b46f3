"""``Segmenter``: images in, label maps out, for any method (METHODS.md §1 "Logits to labels").

NumPy-facing ``predict`` / ``predict_batch`` / ``segment_batch`` sit over a tensor core: crops of all
images are cut by index (no per-crop loop), grouped by size, run through the method in batches of
``settings.batch_size``, and their upsampled logits are scattered back with one ``index_add_`` per
batch. The per-image tail (resize to the original size, softmax, class max, thresholds) runs once
per image.
"""
from __future__ import annotations

import math
import operator
import os
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .benchmarks import BENCHMARKS, method_settings
from .benchmarks import class_names as benchmark_class_names
from .graphs import CaptureFailed, GraphedEncoder
from .images import ImageLike, bilinear_row_bands, resize_short_side_tensor, to_rgb_array
from .methods import build_method
from .methods.base import DenseOutput
from .model_factory import load_clip
from .pamr import pamr_row_bands
from .plans import resolve_attention_kernels, resolve_plan
from .settings import DISTRACTION_DIMS, METHOD_SPECIFIC_SETTINGS, base_arch, make_settings, unused_settings
from .text import TextEncoder
from .vit import DenseViT
from .vocabulary import VocabularyLike, flatten, normalize_vocabulary
from .warn import warn
from .weights import OPENAI_MEAN, OPENAI_STD

MEAN, STD = OPENAI_MEAN, OPENAI_STD        # the default normalisation; a Segmenter uses its weights' own
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Bytes of each band of original-size logits that ``Segmenter._labels`` makes at a time; about four
# times that is in memory at once (logits, scaled, probabilities, classes).
LABEL_BAND_BYTES = 256 * 2 ** 20


@dataclass
class Prediction:
    """One image's result at its original (upright) size.

    Attributes:
        labels: ``(H, W) int32`` class indices in vocabulary order.
        confidence: ``(H, W) float32`` probability of the chosen class (before ``prob_thd``).
    """

    labels: np.ndarray
    confidence: np.ndarray


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Windows ``(y1, y2, x1, x2)`` covering an image (§1.2); one window if ``crop <= 0``.

    ``h_grids = ceil(max(H - crop, 0) / stride) + 1``; window i starts at ``i * stride`` and is
    shifted back inside the image. An image smaller than the crop is one window. Raises ValueError for a
    ``stride`` that is not in ``1..crop`` (windows would leave rows and columns uncovered).
    """
    if crop <= 0:
        return [(0, height, 0, width)]
    if not 1 <= stride <= crop:
        raise ValueError(f"stride must lie in 1..crop ({crop}), got {stride}: windows further apart than "
                         f"their size leave pixels uncovered")
    out = []
    ny = math.ceil(max(height - crop, 0) / stride) + 1
    nx = math.ceil(max(width - crop, 0) / stride) + 1
    for i in range(ny):
        y2 = min(i * stride + crop, height)
        y1 = max(y2 - crop, 0)
        for j in range(nx):
            x2 = min(j * stride + crop, width)
            x1 = max(x2 - crop, 0)
            out.append((y1, y2, x1, x2))
    return out


def pick_device(device: Optional[str] = None) -> torch.device:
    """``device`` as a ``torch.device``; None picks CUDA when available. A CUDA device where CUDA is not
    available is an error now, not at the first tensor."""
    if device is None or (isinstance(device, str) and device == ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        try:
            if isinstance(device, bool):
                raise TypeError
            device = operator.index(device)                          # a CUDA index (numpy ints too)
        except TypeError:
            raise TypeError(f"device is a string ('cpu', 'cuda', 'cuda:1'), a CUDA index, a torch.device or "
                            f"None, not {device!r}") from None
    try:
        picked = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N' (None picks CUDA when "
                         f"available)") from None
    if picked.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: rfclip runs on 'cpu' and 'cuda' devices")
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here (torch "
                         f"{torch.__version__}); leave device unset or pass 'cpu'")
    return picked


def _original_sizes(sizes, resized: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``sizes`` as one ``(H, W)`` pair of positive ints per ``resized`` image ``(h, w)``; ``ValueError``
    naming the first that is not, or whose aspect ratio is not the resized image's (up to the rounding of
    the resize: ``|h W - w H| <= H + W``), as a ``(W, H)`` pair's is not."""
    sizes = list(sizes)
    if len(sizes) != len(resized):
        raise ValueError(f"original_sizes must have one (H, W) per image: {len(sizes)} for {len(resized)} images")
    out = []
    for i, (hw, (rh, rw)) in enumerate(zip(sizes, resized)):
        try:
            h, w = hw
            ok = all(not isinstance(v, (bool, np.bool_)) and float(v) == int(v) > 0 for v in (h, w))
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ValueError(f"original_sizes[{i}] must be (H, W), two positive whole numbers, got {hw!r}")
        h, w = int(h), int(w)
        if abs(rh * w - rw * h) > h + w:
            raise ValueError(f"original_sizes[{i}] = {hw!r} (H, W) has another aspect ratio than its resized image "
                             f"({rh} x {rw}): sizes are (height, width)")
        out.append((h, w))
    return out


class Segmenter:
    """Open-vocabulary semantic segmentation with a frozen open_clip ViT.

    Args:
        model: open_clip architecture (``"ViT-B-16"``, ``"ViT-L-14"``, ...) or an open_clip model-config
            JSON path.
        weights: open_clip pretrained tag, local checkpoint, or fsspec URL (see ``rfclip.weights``).
        method: one of ``rfclip.available_methods()``.
        vocabulary: classes in label order: a list of names, a list of synonym lists, or a
            ``"sky, cloud; road"`` string. Defaults to the benchmark's classes when ``benchmark`` is set.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when available.
        weights_sha256: expected sha256 of the weights file; a mismatch is an error.
        storage_options: fsspec options for a weights URL.
        benchmark: apply the method's published settings for this benchmark preset.
        quick_gelu: force the activation; None infers it (OpenAI weights and the open_clip tags whose
            config says so use QuickGELU).
        image_mean, image_std: the per-channel (RGB, 0-1 scale) normalisation of the input; None takes
            the tag's pretrained config, else OpenAI's.
        **settings: any field of ``rfclip.settings.Settings``.
    """

    def __init__(self, model: str = "ViT-B-16", weights: str = "openai", method: str = "rfclip",
                 vocabulary: Optional[VocabularyLike] = None, device: Optional[str] = None,
                 weights_sha256: Optional[str] = None, storage_options: Optional[dict] = None,
                 benchmark: Optional[str] = None, quick_gelu: Optional[bool] = None,
                 image_mean: Optional[tuple] = None, image_std: Optional[tuple] = None, **settings):
        if benchmark is not None and vocabulary is not None:
            raise ValueError(f"give a vocabulary or a benchmark, not both: {benchmark}'s settings assume its own "
                             f"classes (its prob_thd makes class 0 background); set_vocabulary() after construction "
                             f"changes the classes and keeps the settings, if that is what you mean")
        if quick_gelu is not None and not isinstance(quick_gelu, bool):
            raise TypeError(f"quick_gelu is True, False or None (inferred from the weights), not {quick_gelu!r}")
        layers = [method_settings(method, benchmark)] if benchmark else []
        self.settings = make_settings(method, *layers, settings)
        unused = unused_settings(method, settings)
        if unused:
            warn(f"method {method!r} does not use the setting(s) {unused}: its results do not depend on them",
                 UserWarning)
        if vocabulary is None:
            if benchmark is None:
                raise ValueError("give a vocabulary (or a benchmark whose classes to use)")
            vocabulary = BENCHMARKS[benchmark].vocabulary
        vocabulary = normalize_vocabulary(vocabulary)           # a bad one fails before the weights load
        self.device = pick_device(device)
        self.dtype = DTYPES[self.settings.precision]
        clip, tokenizer, arch, resolved = load_clip(model, weights, weights_sha256, storage_options,
                                                     quick_gelu=quick_gelu, image_mean=image_mean,
                                                     image_std=image_std)
        self.model_name, self.arch, self.weights = os.fspath(model), arch, resolved
        self.benchmark, self.method_name = benchmark, method
        clip = clip.to(self.device)
        clip.visual.to(self.dtype)
        self.clip = clip
        self.vit = DenseViT(clip.visual)
        side = self.settings.global_input_size
        if side is not None and side % self.vit.patch:
            raise ValueError(f"global_input_size must be a multiple of the patch size {self.vit.patch}, got {side}")
        if 0 < self.settings.slide_crop < self.vit.patch:
            raise ValueError(f"slide_crop must be 0 (the whole image) or at least the patch size {self.vit.patch}, "
                             f"got {self.settings.slide_crop}")
        self.method = build_method(method, self.vit, self.settings, arch)
        known_dims = DISTRACTION_DIMS.get(base_arch(arch))
        if (self.settings.distraction_dims is None and known_dims is not None and not resolved.openai
                and not unused_settings(method, ["distraction_dims"])):
            warn(f"method {method!r} uses the distraction dimensions {list(known_dims)}, which "
                 f"were found on OpenAI's {base_arch(arch)} weights (METHODS.md §3a); {resolved.spec} is not a known "
                 f"OpenAI checkpoint, and other weights put their over-active channels elsewhere. Find theirs with "
                 f"`python -m rfclip.find_distraction_dims --model {model} --weights {resolved.spec} --images DIR` and "
                 f"pass distraction_dims=[...] (CLI: --setting distraction_dims=[...]); passing them, these "
                 f"included, silences this warning", UserWarning)
        self.plan = resolve_plan(self.settings, self.device)           # the plan running now (see execution())
        self.fallbacks: list[str] = []
        # The crops' forward pass is replayed from CUDA graphs on the graphed plan (see rfclip.graphs).
        self._graphed = GraphedEncoder(self.method.encode, self.settings.batch_size) if self.plan == "graphed" else None
        self.text_encoder = TextEncoder(clip, tokenizer, self.device,
                                        identity=f"{arch}|{resolved.sha256}|{resolved.quick_gelu}")
        self._mean = torch.tensor(resolved.mean, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(resolved.std, device=self.device).view(3, 1, 1)
        self.set_vocabulary(vocabulary)

    # ---- vocabulary ----------------------------------------------------------------------------
    def set_vocabulary(self, vocabulary: VocabularyLike) -> None:
        """Switch classes; query embeddings are cached per name, so a repeat costs nothing."""
        self.vocabulary = normalize_vocabulary(vocabulary)
        names, owner = flatten(self.vocabulary)
        self.query_names = names
        self.text = self.text_encoder.encode_names(names)                      # (Q, E) float32
        self._owner = torch.tensor(owner, device=self.device)                 # (Q,)

    @property
    def class_names(self) -> list[str]:
        """Each class's first name; "background" for class 0 of a background benchmark's own vocabulary."""
        return benchmark_class_names(self.vocabulary, self.benchmark)

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary)

    def config(self) -> dict:
        """JSON-able description: method, model, weights identity and sha256, vocabulary, settings."""
        return {
            "method": self.method_name, "model": self.model_name, "arch": self.arch,
            "weights": {"spec": self.weights.spec, "kind": self.weights.kind, "sha256": self.weights.sha256,
                        "quick_gelu": self.weights.quick_gelu, "image_mean": list(self.weights.mean),
                        "image_std": list(self.weights.std)},
            "benchmark": self.benchmark, "vocabulary": [list(c) for c in self.vocabulary],
            "settings": self.settings.to_dict(),
            "device": str(self.device),
        }

    def execution(self) -> dict:
        """How the forward passes run so far, JSON-able: ``device`` (and ``device_name`` on CUDA), ``plan``,
        ``attention_kernels`` as resolved (not ``"auto"``) and ``ncut_kernels`` (kernels only for methods
        that use them), ``distractors`` (RF-CLIP's methods: the distraction ``dims``, ``tau`` and
        ``min_received_attention`` that ran, where the settings say None for the architecture's known
        ones), and ``fallbacks``: what ``"auto"`` gave up on, and why (a failed graph capture, kernel tiles
        this GPU cannot hold)."""
        out = {"device": str(self.device), "plan": self.plan}
        if self.device.type == "cuda":
            out["device_name"] = torch.cuda.get_device_name(self.device)
        if hasattr(self.method, "refused_tiles"):                      # methods with RF-CLIP's kernels
            out["attention_kernels"] = resolve_attention_kernels(self.method.settings, self.device)
            out["ncut_kernels"] = self.method.settings.ncut_kernels
        if "distraction_dims" in METHOD_SPECIFIC_SETTINGS.get(self.method_name, ()):
            # As resolved: the settings say None for "the known ones for this architecture" (config()).
            from .methods.rfclip import distraction_setup
            dims, tau, min_received = distraction_setup(self.method, self.device)
            out["distractors"] = {"dims": dims.tolist(), "tau": tau, "min_received_attention": min_received}
        refused = getattr(self.method, "refused_tiles", dict)()
        out["fallbacks"] = sorted(self.fallbacks + [f"attention kernels: {why}; ran PyTorch's kernels"
                                                    for why in refused.values()])
        return out

    def _encode_crops(self, x: torch.Tensor) -> DenseOutput:
        """The method's forward pass on crops ``(B, 3, H, W)``, replayed from CUDA graphs on the graphed plan.
        If ``plan="auto"`` chose that plan and CUDA refuses a capture, the fused plan (host checks, no
        graphs) runs from then on, with one warning; a named ``"graphed"`` raises."""
        if self._graphed is None:
            return self.method.encode(x)
        try:
            return self._graphed(x)
        except CaptureFailed as e:
            if self.settings.plan != "auto":
                raise
            warn(f"plan='auto': capturing the forward pass as a CUDA graph failed ({e.reason}). Running the "
                 f"'fused' plan from now on.")
            self.fallbacks.append(f"graphed plan: CUDA graph capture failed ({e.reason}); ran the fused plan")
            self.plan, self._graphed = "fused", None                  # the graphs and their memory pool go
            self.method.settings = replace(self.method.settings, plan="fused")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return self.method.encode(x)

    # ---- tensor core ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features ``(B, h, w, E)`` of normalised images ``(B, 3, H, W)`` (multiples of the patch).

        After ``ln_post`` and ``proj``, before L2 normalisation; in the model's precision.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"encode_dense takes a torch tensor (B, 3, H, W), not a {type(x).__name__}"
                            f"{': torch.from_numpy(x)' if isinstance(x, np.ndarray) else ''}")
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
            raise ValueError(f"encode_dense takes a non-empty (B, 3, H, W) tensor, got {tuple(x.shape)}"
                             f"{'; add a batch dimension: x[None]' if x.ndim == 3 else ''}")
        if not x.is_floating_point():
            raise TypeError(f"encode_dense takes normalised float images ((x / 255 - mean) / std), not {x.dtype}")
        p = self.vit.patch
        if x.shape[2] < p or x.shape[3] < p:
            raise ValueError(f"encode_dense: images of {x.shape[2]}x{x.shape[3]} hold no {p}x{p} patch")
        return self._encode_crops(x.to(self.device, self.dtype)).features

    def _normalise(self, image: torch.Tensor) -> torch.Tensor:
        """``(3, h, w) uint8`` on the device to the model's normalised input, in its dtype."""
        return ((image.float() / 255.0 - self._mean) / self._std).to(self.dtype)

    def _global_embeddings(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Unit CLS embeddings ``(n, E)`` float32 of whole images, from the method's own forward pass.

        Each image ``(3, h, w)`` runs once, whole, padded to a multiple of the patch (or resized to a
        square ``global_input_size`` when that is set). Images of the same padded size share forward
        batches of up to ``batch_size``.
        """
        p, side = self.vit.patch, self.settings.global_input_size
        inputs = []
        for t in images:
            if side:
                x = F.interpolate(t[None].float(), size=(side, side), mode="bilinear", align_corners=False)
                inputs.append(x[0].to(self.dtype))
            else:
                h, w = t.shape[1:]
                inputs.append(F.pad(t, (0, math.ceil(w / p) * p - w, 0, math.ceil(h / p) * p - h)))
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, x in enumerate(inputs):
            by_size[tuple(x.shape[1:])].append(i)
        out = torch.empty(len(images), self.vit.visual.output_dim, device=self.device)
        for members in by_size.values():
            for start in range(0, len(members), self.settings.batch_size):
                chunk = members[start:start + self.settings.batch_size]
                cls = self.method.encode(torch.stack([inputs[i] for i in chunk])).cls
                out[torch.tensor(chunk, device=self.device)] = cls.float()
        return F.normalize(out, dim=-1)

    @torch.inference_mode()
    def _image_logits(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sliding-window logits ``(Q, h, w)`` float32 for each normalised image ``(3, h, w)``."""
        s, p = self.settings, self.vit.patch
        q = self.text.shape[0]
        sizes = [tuple(t.shape[1:]) for t in images]
        offsets = np.cumsum([0] + [h * w for h, w in sizes])
        acc = torch.zeros(q, int(offsets[-1]), device=self.device)
        cnt = torch.zeros(int(offsets[-1]), device=self.device)
        # One window per image (slide_crop 0) means the crop is the whole image: its CLS is the global one.
        # (Read only by the methods that use a global embedding: METHOD_SPECIFIC_SETTINGS.)
        from_crop = self.method.needs_global_embedding and (s.global_from_crop or s.slide_crop <= 0)
        use_global = self.method.needs_global_embedding and not from_crop and (
            s.global_semantics_weight > 0 or s.mean_vector_weight > 0)
        global_embs = self._global_embeddings(images) if use_global else None

        # Crop index per image, grouped by crop size: {(ch, cw): [(image, y1s, x1s)]}.
        groups: dict[tuple[int, int], list] = defaultdict(list)
        for i, (h, w) in enumerate(sizes):
            wins = torch.tensor(sliding_windows(h, w, s.slide_crop, s.slide_stride))
            ch, cw = int(wins[0, 1] - wins[0, 0]), int(wins[0, 3] - wins[0, 2])
            groups[(ch, cw)].append((i, wins[:, 0], wins[:, 2]))

        for (ch, cw), members in groups.items():
            ph, pw = math.ceil(ch / p) * p, math.ceil(cw / p) * p
            ry, rx = torch.arange(ch), torch.arange(cw)
            crops, index, owner = [], [], []
            for i, y1, x1 in members:
                rows, cols = (y1[:, None] + ry).to(self.device), (x1[:, None] + rx).to(self.device)
                crops.append(images[i][:, rows[:, :, None], cols[:, None, :]].transpose(0, 1))   # (n, 3, ch, cw)
                index.append(int(offsets[i]) + rows[:, :, None] * sizes[i][1] + cols[:, None, :])
                owner.append(torch.full((len(y1),), i, device=self.device))
            crops_t = F.pad(torch.cat(crops), (0, pw - cw, 0, ph - ch))
            index_t, owner_t = torch.cat(index), torch.cat(owner)
            for start in range(0, len(crops_t), s.batch_size):
                sl = slice(start, start + s.batch_size)
                out = self._encode_crops(crops_t[sl])
                feats = F.normalize(out.features.float(), dim=-1)
                g = None
                if self.method.needs_global_embedding:
                    g = F.normalize(out.cls.float(), dim=-1) if from_crop else (
                        global_embs[owner_t[sl]] if global_embs is not None else None)
                logits = self.method.crop_logits(feats, self.text, g)                       # (b, Q, gh, gw)
                logits = F.interpolate(logits, size=(ph, pw), mode="bilinear", align_corners=False)
                logits = logits[:, :, :ch, :cw]
                idx = index_t[sl].reshape(-1)
                acc.index_add_(1, idx, logits.permute(1, 0, 2, 3).reshape(q, -1))
                cnt.index_add_(0, idx, torch.ones_like(idx, dtype=cnt.dtype))
        return [(acc[:, offsets[i]:offsets[i + 1]] / cnt[offsets[i]:offsets[i + 1]]).view(q, *sizes[i])
                for i in range(len(images))]

    def _labels(self, logits: torch.Tensor, size: tuple[int, int], image: torch.Tensor) -> Prediction:
        """Logits ``(Q, h, w)`` to a :class:`Prediction` at ``size`` ``(H, W)`` (§1 steps 3-6).

        The ``(Q, H, W)`` logits at the original size, and the probabilities after them, are made a band of
        rows at a time (:data:`LABEL_BAND_BYTES` each, :data:`~rfclip.pamr.PAMR_BAND_BYTES` with PAMR), so
        memory does not grow with the vocabulary times the image's pixels: whole, a 12 MP photo with 150
        names would take about 20 GB.
        """
        s = self.settings
        if s.pamr:
            # PAMR on the logits at the original size; the colour guide is the working image resized
            # back to that size (the original pixels are not kept when a CPU task resized them).
            def bands():
                return pamr_row_bands(logits, image, size)
        else:
            def bands():
                return bilinear_row_bands(logits, size, LABEL_BAND_BYTES)
        conf = torch.empty(size, device=logits.device)
        labels = torch.empty(size, dtype=torch.long, device=logits.device)

        # The area rule looks at the class probabilities twice; they are kept for it (K <= Q of them)
        # where they take at most 4 bands' memory, and made again otherwise (PAMR's refinement too).
        keep = s.area_thd is not None and self.num_classes * size[0] * size[1] * 4 <= 4 * LABEL_BAND_BYTES
        kept: list = []

        def label_bands(drop: Optional[torch.Tensor] = None) -> None:
            made = ((r0, r1, self._class_probs(band)) for r0, r1, band in bands())
            for r0, r1, cls in kept or made:                                          # cls: (K, b, W)
                if keep and drop is None:
                    kept.append((r0, r1, cls))
                if drop is not None:
                    cls[drop] = 0.0
                torch.max(cls, dim=0, out=(conf[r0:r1], labels[r0:r1]))

        label_bands()
        if s.area_thd is not None:
            counts = torch.bincount(labels.flatten(), minlength=self.num_classes)
            fg = counts[1:].sum()
            # Every class at or below the threshold goes, zero-area ones included (as SCLIP), so a
            # dropped class's pixels can't move to a runner-up that won no pixel of its own.
            drop = counts <= s.area_thd * fg
            drop[0] = False
            if bool(drop.any()):
                label_bands(drop)
        if s.prob_thd > 0:
            labels = torch.where(conf < s.prob_thd, torch.zeros_like(labels), labels)
        return Prediction(labels.to(torch.int32).cpu().numpy(), conf.float().cpu().numpy())

    def _class_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(K, ...)`` of query logits ``(Q, ...)``: the softmax over all query names,
        then the max over each class's names (§1 step 5)."""
        probs = (self.settings.logit_scale * logits).softmax(dim=0)
        cls = torch.zeros(self.num_classes, *probs.shape[1:], device=probs.device)
        cls.scatter_reduce_(0, self._owner.view(-1, *[1] * (probs.dim() - 1)).expand_as(probs), probs,
                            reduce="amax", include_self=False)
        return cls

    # ---- NumPy-facing API ----------------------------------------------------------------------
    @torch.inference_mode()
    def segment_batch(self, images: Sequence[ImageLike],
                      original_sizes: Optional[Sequence[tuple[int, int]]] = None) -> list[Prediction]:
        """Segment several images at once; crops of all of them share forward batches.

        Args:
            images: a list (any iterable) of PIL images or ``(H, W[, C])`` arrays (converted with
                ``to_rgb_array``), or one ``(B, H, W, C)`` array.
            original_sizes: if given, ``images`` are already resized with
                ``resize_short_side(img, settings.short_side, settings.max_long_side)`` (for example in a
                CPU task) and each prediction comes back at ``original_sizes[i]`` ``(H, W)``.
        Returns:
            one :class:`Prediction` per image, at its original size.
        """
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)                                    # (B, H, W, C): a batch of arrays
        if isinstance(images, (np.ndarray, torch.Tensor, str, bytes)) or hasattr(images, "getpixel"):
            raise TypeError(f"segment_batch takes a list of images, not one {type(images).__name__}: "
                            f"segment_batch([image]), or predict(image)")
        images = list(images)
        if len(images) == 0:
            return []
        rgbs = [to_rgb_array(im) for im in images]
        # uint8 goes to the device, and is resized there (4x less to copy than float32, and fast).
        # np.require: contiguous and writable (an array over a PIL image's buffer is read-only, and
        # torch.from_numpy warns of those), copied only where it is not.
        uint8 = [torch.from_numpy(np.require(r, requirements=["C", "W"])).to(self.device).permute(2, 0, 1)
                 for r in rgbs]
        if original_sizes is None:
            sizes = [tuple(r.shape[:2]) for r in rgbs]
            uint8 = [resize_short_side_tensor(t, self.settings.short_side, self.settings.max_long_side)
                     for t in uint8]
        else:
            sizes = _original_sizes(original_sizes, [tuple(r.shape[:2]) for r in rgbs])
        tensors = [self._normalise(t) for t in uint8]
        logits = self._image_logits(tensors)
        return [self._labels(l, size, t) for l, size, t in zip(logits, sizes, tensors)]

    def predict(self, image: ImageLike) -> np.ndarray:
        """``(H, W) int32`` label map of one image at its original size."""
        return self.segment_batch([image])[0].labels

    def predict_batch(self, images: Sequence[ImageLike]) -> list[np.ndarray]:
        """Label maps of several images; crops are batched across images."""
        return [p.labels for p in self.segment_batch(images)]
