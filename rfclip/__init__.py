"""RF-CLIP and the training-free dense-CLIP family for open-vocabulary semantic segmentation.

>>> import rfclip
>>> seg = rfclip.Segmenter(model="ViT-B-16", weights="openai", method="rfclip",
...                        vocabulary=["sky", "road", ["car", "vehicle"]])
>>> labels = seg.predict(image)          # (H, W) int32, image: PIL image or HxWx3 uint8 array
"""
from .images import resize_short_side, to_rgb_array
from .methods import available_methods
from .segmenter import Prediction, Segmenter, sliding_windows
from .settings import Settings
from .vocabulary import load_vocabulary, parse_vocabulary
from .weights import WeightsError, WeightsUnavailableError

from . import benchmarks, testing  # noqa: E402  (public submodules)

__version__ = "0.1.0"
# Raised by one whenever a change alters what a given model, vocabulary and settings segment, so a
# resumed job can say its shards were made by two revisions (pipeline.run_record). 2: resized_shape
# rounds half up, as mmcv does.
OUTPUT_REVISION = 2

__all__ = [
    "Prediction", "Segmenter", "Settings", "WeightsError", "WeightsUnavailableError", "available_methods",
    "benchmarks", "load_vocabulary", "parse_vocabulary", "resize_short_side", "sliding_windows", "testing",
    "to_rgb_array",
]
