"""Every setting a method takes, with its meaning and its per-method default (METHODS.md §2-§4).

A ``Segmenter`` resolves its settings as: the method's defaults, then the benchmark preset's values
(``rfclip.benchmarks.method_settings``) if a benchmark is named, then the user's keyword arguments.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, get_origin, get_type_hints

import numpy as np

# Distraction dimensions (0-indexed residual-stream channels), METHODS.md §3a.
DISTRACTION_DIMS = {
    "ViT-B-16": (4, 162, 189, 326, 429, 474, 633, 713),
    "ViT-L-14": (250, 261, 437, 650, 720, 779, 936, 1005),
}
# ViT-L/14 distractors must also receive this head-averaged mean attention ([decision], §3a).
MIN_RECEIVED_ATTENTION = {"ViT-L-14": 0.1}


def base_arch(arch: str) -> str:
    """``"ViT-B-16-quickgelu"`` -> ``"ViT-B-16"``: the weights' family for the tables above."""
    return arch[: -len("-quickgelu")] if arch.endswith("-quickgelu") else arch


@dataclass(frozen=True)
class Settings:
    """Segmentation settings. Defaults here are generic; each method overrides some (``METHOD_DEFAULTS``).

    Logits to labels (§1):
        logit_scale: softmax temperature applied to cosine logits.
        prob_thd: a pixel whose best class probability is below this gets label 0 (background);
            0 disables it. Only meaningful when class 0 is a background class.
        area_thd: SCLIP's VOC21 rule: after labelling, classes other than 0 whose area is at most
            this fraction of the foreground are removed (their probability set to 0). None disables.
        short_side: the image is resized so its short side is this (0 keeps the size).
        max_long_side: cap on the resized long side.
        slide_crop, slide_stride: sliding-window size and stride in pixels; ``slide_crop = 0`` runs
            the whole image in one pass. [decision] Every method pads a crop (or whole image) on the
            bottom/right to a multiple of the patch size and cuts the padding off the logits again, as
            ClearCLIP does (METHODS.md §2), instead of dropping the remainder pixels.
        pamr: refine logits with PAMR (10 iterations, dilations 8 and 16).
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` for the image tower.
        batch_size: crops per forward pass (crops of several images share a batch).
    RF-CLIP (§3):
        tau: distractor threshold on phi; None means ``5 / width``.
        distraction_dims: channels; None means the known set for the architecture (ViT-B/16, ViT-L/14).
        min_received_attention: extra distractor condition (mean attention received); None means the
            architecture's default (0.1 for ViT-L/14, off otherwise); 0 disables it. [decision] Step (d)
            reuses the attention received in the same block (before redistribution) for this condition.
        lam: fraction of distractor attention moved to defocused tokens.
        distractor_attention, defocus_ncut, embedding_redistribution: switches for §3c, §3b, §3d.
            With ``defocus_ncut`` off, every non-distractor patch receives. [decision] So it does in a
            crop of fewer than 3 patches, where a bipartition has nothing to choose between.
        ncut_solver: ``"eigh"`` (exact), ``"warm"`` (``eigh`` for a crop's first cut, then shifted inverse
            iteration from the crop's previous Fiedler vector, certified by a Cholesky factorisation and
            converged to a residual of 1e-5, with ``eigh`` wherever it is not), ``"subspace"`` (block power
            iteration) or ``"squaring"`` (power iteration as repeated squaring, few large matmuls: the fast
            one on GPUs; its products run in float16 for fp16 and bf16 models on GPUs); ``ncut_iters`` the power
            steps of the last two (None: 30 for ``"subspace"``, 2048 for ``"squaring"``). [decision]
            ``"auto"`` (default) is ``"warm"`` on CPU and ``"squaring"`` on GPUs, where batched ``eigh``
            of 196 x 196 matrices runs one matrix at a time (84-85 ms for 32 on an H100).
            ``"squaring"`` takes ``ceil(log2(ncut_iters))`` squarings. [decision] 2048 (11): on the planted
            benchmark graphs, whose spectral gaps are small, 30 (5) cut every graph differently from
            ``eigh``, 256 (8) 57 of 264, and 2048 none in float32 (bench/PERFORMANCE.md).
        plan: how the forward pass runs; results agree to float rounding (tested), only cost differs.
            ``"explicit"``: RF-CLIP keeps explicit attention matrices; fastest on CPUs.
            ``"fused"``: RF-CLIP runs fused attention passes and keeps no ``(T, T)`` matrices; on GPUs
            those passes are memory-bound and cheaper than the matrices.
            On both, crops and layers without distractors skip the refocusing steps (host-side checks).
            ``"graphed"``: ``"fused"`` without host checks (every crop goes through every step, which is
            the identity where there are no distractors), replayed as CUDA graphs, one per crop-batch
            shape (any method). It saves the host's launch time and syncs, and pays for the skipped
            work. Needs ``ncut_solver`` ``"squaring"`` or ``"auto"`` (cuSOLVER calls cannot be captured).
            ``"auto"``: ``"explicit"`` on CPUs (``"fused"`` with Triton kernels); on CUDA devices
            ``"graphed"`` where crops have a fixed size (``0 < slide_crop <= short_side``) and the cut
            solver can be captured, else ``"fused"``. [decision] On an H100 in bf16 (Triton kernels),
            ``"graphed"`` was 1.4x and 2.5x faster than ``"fused"`` at 32 crops per batch (isolated and
            clustered workloads), 1.2x faster on the clustered workload at 128 crops, and 12% slower on
            the isolated one at 128 (bench/PERFORMANCE.md). If CUDA refuses to capture a graph, ``"auto"``
            warns once and runs ``"fused"`` from then on (``Segmenter.execution()`` says so); a named
            ``"graphed"`` raises ``rfclip.graphs.CaptureFailed``.
        attention_kernels: who runs RF-CLIP's per-block affinity and step (c) on the fused and graphed
            plans: ``"torch"`` (PyTorch ops and fused attention passes) or ``"triton"`` (one Triton kernel
            each, ``rfclip.kernels``; CUDA devices, crops of at most 1024 tokens). Same numbers (tested).
            ``"auto"`` (default): ``"triton"`` for fp16/bf16 models on NVIDIA CUDA devices of compute
            capability 8.0 or more where triton 3+ imports and the plan is not ``"explicit"``, else
            ``"torch"`` (in fp32 the kernels take exact products without tensor cores: for checking,
            not speed); crops whose kernels the GPU cannot hold run on ``"torch"``, with a warning.
            [decision] Measured on an H100 in bf16 at 128 crops, the kernels made RF-CLIP 1.35x faster
            on the graphed plan and 1.23x-1.34x on the fused plan (bench/PERFORMANCE.md).
        ncut_kernels: who runs the ``"squaring"`` cut of fp16 and bf16 models (float16 products):
            ``"torch"`` (default; batched matmuls, with trace divisions between them) or ``"triton"``
            (``rfclip.kernels.squaring_cut_half``: one kernel builds the deflated operator from the raw
            affinity, one per squaring scales its product from the sums of squares the one before wrote).
            The same iteration, agreeing to float16 rounding (tested). Needs an fp16 or bf16 model, the
            ``"squaring"`` solver (``ncut_solver`` ``"squaring"``, or ``"auto"`` on CUDA devices) and a
            CUDA device (or Triton's interpreter, for tests). [decision] Opt-in: written in a session
            without a GPU, its speed on one is not measured yet (bench/PERFORMANCE.md says how to).
    NACLIP: naclip_sigma, the Gaussian's sigma in patches.
    RF-CLIP release (§4):
        release_keep: weight of the unfiltered feature in ``F <- keep F + (1 - keep) F_den``.
        release_sim_threshold: similarities below this are zeroed in feature enhancing.
        global_semantics_weight, mean_vector_weight, h_threshold: the CASS text-side extras (0 disables
            the first two). [decision] Without a benchmark preset, ``rfclip-release`` takes 0.25 / 0.03
            / 0.1: the most frequent values among §4's eight presets (0.03 ties with 0.02 and 0.04);
            no benchmark on real weights chose them.
            [decision] The whole image's CLS embedding (``global_from_crop`` off) comes from the
            method's own forward pass (filtered blocks), as the released code computes it.
        global_from_crop: take the global (CLS) similarity from each crop instead of the whole image.
        global_input_size: side of the square the whole image is resized to for its CLS embedding;
            None runs the whole image at its working size (padded to the patch), as the released code.
    """

    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: Optional[float] = None
    short_side: int = 336
    max_long_side: int = 2048
    slide_crop: int = 224
    slide_stride: int = 112
    pamr: bool = False
    precision: str = "fp32"
    batch_size: int = 16
    tau: Optional[float] = None
    distraction_dims: Optional[tuple[int, ...]] = None
    min_received_attention: Optional[float] = None
    lam: float = 0.7
    distractor_attention: bool = True
    defocus_ncut: bool = True
    embedding_redistribution: bool = True
    ncut_solver: str = "auto"
    ncut_iters: Optional[int] = None
    plan: str = "auto"
    attention_kernels: str = "auto"
    ncut_kernels: str = "torch"
    naclip_sigma: float = 5.0
    release_keep: float = 0.6
    release_sim_threshold: float = 0.4
    global_semantics_weight: float = 0.0
    mean_vector_weight: float = 0.0
    h_threshold: float = 0.1
    global_from_crop: bool = False
    global_input_size: Optional[int] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["distraction_dims"] is not None:
            d["distraction_dims"] = list(d["distraction_dims"])
        return d


SETTING_NAMES = tuple(f.name for f in fields(Settings))
# Each setting's base type (bool, int, float, str or tuple of ints); _OPTIONAL: those that may be None.
_TYPES = {name: get_origin(base) or base
          for name, t in get_type_hints(Settings).items()
          for base in [t.__args__[0] if type(None) in getattr(t, "__args__", ()) else t]}
_OPTIONAL = {name for name, t in get_type_hints(Settings).items()
             if type(None) in getattr(t, "__args__", ())}
_TRUE, _FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")
# Numeric settings' ranges: name -> (lowest, highest or None, lowest itself excluded).
_RANGES = {
    "logit_scale": (0, None, True), "naclip_sigma": (0, None, True), "lam": (0, 1, False),
    "batch_size": (1, None, False), "short_side": (0, None, False), "max_long_side": (1, None, False),
    "prob_thd": (0, 1, False), "area_thd": (0, 1, False), "release_keep": (0, 1, False),
    "release_sim_threshold": (-1, 1, False), "h_threshold": (0, 2, False), "global_semantics_weight": (0, 1, False),
    "mean_vector_weight": (0, 1, False), "tau": (0, None, False), "min_received_attention": (0, 1, False),
    "ncut_iters": (1, None, False), "global_input_size": (1, None, False),
}
# The settings only some methods use; every other setting (labels, windows, precision, plan, ...) is used
# by all of them. A method given one it does not use computes the same thing as without it (Segmenter
# warns). The kernel and solver settings also pick every method's plan (rfclip.plans.resolve_plan), which
# changes how a forward runs, not what it computes.
METHOD_SPECIFIC_SETTINGS: dict[str, frozenset] = {
    "naclip": frozenset({"naclip_sigma"}),
    "rfclip": frozenset({"tau", "distraction_dims", "min_received_attention", "lam", "distractor_attention",
                         "defocus_ncut", "embedding_redistribution", "ncut_solver", "ncut_iters",
                         "attention_kernels", "ncut_kernels"}),
    "rfclip-release": frozenset({"tau", "distraction_dims", "release_keep", "release_sim_threshold",
                                 "h_threshold", "global_semantics_weight", "mean_vector_weight",
                                 "global_from_crop", "global_input_size"}),
}


def unused_settings(method: str, names) -> list[str]:
    """Those of ``names`` that ``method`` does not read (:data:`METHOD_SPECIFIC_SETTINGS`), sorted."""
    specific = frozenset().union(*METHOD_SPECIFIC_SETTINGS.values())
    return sorted(n for n in names if n in specific and n not in METHOD_SPECIFIC_SETTINGS.get(method, ()))


NCUT_SOLVERS = ("auto", "eigh", "warm", "subspace", "squaring")
PLANS = ("auto", "explicit", "fused", "graphed")
ATTENTION_KERNELS = ("auto", "torch", "triton")
NCUT_KERNELS = ("torch", "triton")


METHOD_DEFAULTS: dict[str, dict] = {
    "clip": {},
    "maskclip": {},
    "sclip": {},
    "clearclip": {"logit_scale": 50.0, "short_side": 448, "slide_crop": 448, "slide_stride": 224},
    "naclip": {},
    "rfclip": {},
    "rfclip-release": {"global_semantics_weight": 0.25, "mean_vector_weight": 0.03, "h_threshold": 0.1},
}


def coerce_setting(name: str, value):
    """``value`` as the type of setting ``name``, or a ``ValueError`` that says what was expected.

    Accepts what a command line gives as well as Python values: ``"off"``/``"false"``/``"no"``/``"0"``
    (any case) for False and their opposites for True, ``"none"``/``"null"`` for an optional setting's
    None, ``"4,162,189"``, one index or a list for ``distraction_dims``; NumPy scalars and arrays as
    their Python values. Never guesses: ``2.5`` is not an int, ``"no"`` is not True, a bool is not an
    int (``True`` is no crop size), and of the ints only 0 and 1 are bools (as ``"0"`` and ``"1"`` are).
    """
    if name not in _TYPES:
        raise ValueError(f"unknown setting {name!r}; settings are {', '.join(SETTING_NAMES)}")
    kind, optional = _TYPES[name], name in _OPTIONAL
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            tuple: "a non-empty list of channel indices such as [4,162,189]"}[kind]
    bad = ValueError(f"setting {name} must be {want}{' or none' if optional else ''}; got {value!r}")
    if kind is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        text = str(value).strip().lower() if isinstance(value, (str, numbers.Integral)) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise bad
    if kind is int:
        if not _is_number(value) or not math.isfinite(value) or value != int(value):
            raise bad
        return int(value)
    if kind is float:
        if not _is_number(value) or not math.isfinite(value):
            raise bad
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise bad
        return value
    # distraction_dims: a list, tuple or array of channel indices, one index, or "4,162,189".
    if isinstance(value, str):
        try:
            value = [int(v) for v in re.split(r"[,\s]+", value.strip("[] ")) if v]
        except ValueError:
            raise bad from None
    elif isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        value = [value]
    elif isinstance(value, (np.ndarray, range)):
        value = list(value.tolist() if isinstance(value, np.ndarray) and value.ndim == 1 else value)
    if not isinstance(value, (list, tuple)) or not value:
        raise bad
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < 0 for v in value):
        raise bad
    return tuple(int(v) for v in value)


def _is_number(value) -> bool:
    """A real number (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def make_settings(method: str, *layers: dict) -> Settings:
    """The method's defaults, updated by each dict in ``layers`` in order; every value is checked
    against its setting's type and range (``coerce_setting``); unknown names are an error."""
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHOD_DEFAULTS)}")
    merged: dict = dict(METHOD_DEFAULTS[method])
    for layer in layers:
        unknown = set(layer) - set(SETTING_NAMES)
        if unknown:
            raise TypeError(f"unknown setting(s) {sorted(unknown)}; settings are {list(SETTING_NAMES)}")
        merged.update({name: coerce_setting(name, value) for name, value in layer.items()})
    s = replace(Settings(), **merged)
    _validate(s)
    return s


def _validate(s: Settings) -> None:
    if s.precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {s.precision!r}")
    if s.slide_crop < 0 or (s.slide_crop > 0 and not 0 < s.slide_stride <= s.slide_crop):
        raise ValueError("slide_crop must be >= 0, and 0 < slide_stride <= slide_crop when sliding "
                         "(a larger stride would leave pixels no window covers)")
    if s.ncut_solver not in NCUT_SOLVERS:
        raise ValueError(f"ncut_solver must be one of {', '.join(NCUT_SOLVERS)}; got {s.ncut_solver!r}")
    if s.plan not in PLANS:
        raise ValueError(f"plan must be one of {', '.join(PLANS)}; got {s.plan!r}")
    if s.attention_kernels not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernels must be one of {', '.join(ATTENTION_KERNELS)}; "
                         f"got {s.attention_kernels!r}")
    if s.attention_kernels == "triton" and s.plan == "explicit":
        raise ValueError("attention_kernels='triton' runs on the fused and graphed plans, not 'explicit'")
    if s.ncut_kernels not in NCUT_KERNELS:
        raise ValueError(f"ncut_kernels must be one of {', '.join(NCUT_KERNELS)}; got {s.ncut_kernels!r}")
    if s.ncut_kernels == "triton" and (s.precision == "fp32" or s.ncut_solver not in ("auto", "squaring")):
        raise ValueError(f"ncut_kernels='triton' runs the 'squaring' cut with float16 products, that of fp16 and "
                         f"bf16 models: it needs precision fp16 or bf16 (got {s.precision!r}) and ncut_solver "
                         f"'squaring' or 'auto' (got {s.ncut_solver!r})")
    if s.plan == "graphed" and s.ncut_solver not in ("auto", "squaring"):
        raise ValueError(f"plan='graphed' needs ncut_solver 'squaring' or 'auto': {s.ncut_solver!r} calls "
                         f"cuSOLVER, which CUDA graphs cannot capture")
    for name, (low, high, low_excluded) in _RANGES.items():
        v = getattr(s, name)
        if v is None:
            continue
        if v < low or (low_excluded and v == low) or (high is not None and v > high):
            what = (f"in [{low}, {high}]" if high is not None else f"{'>' if low_excluded else '>='} {low}")
            raise ValueError(f"setting {name} must be {what}, got {v}")
