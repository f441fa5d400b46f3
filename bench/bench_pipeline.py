"""Images/second of the Ray job vs an in-process loop over the same images, same Segmenter settings.

    python bench/bench_pipeline.py --images 200 --size 360x480 [--model ViT-B-16 --weights openai]

Without --model a tiny random model is used (the only weights available offline). The loop does what
the job does per image (read, decode, resize in the driver, ``segment_batch`` with original sizes,
PNG-encode the label map) in one process; the job runs ``pipeline.job.run`` with an
in-process Ray. Prints both rates and their ratio (target >= 0.9 on one machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", default="360x480", help="HxW of the generated JPEGs")
    ap.add_argument("--model"), ap.add_argument("--weights")
    ap.add_argument("--method", default="rfclip")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--setting", action="append", default=[], help="key=json (same for both)")
    args = ap.parse_args()

    import rfclip
    from pipeline.job import run
    from pipeline.job_config import JobConfig, segmenter_kwargs
    from rfclip.decode import decode_image
    from pipeline.sinks import encode_label_png

    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    h, w = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    (tmp / "in").mkdir()
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp / "in" / f"{i:05d}.jpg", quality=90)
    settings = {"short_side": 224, "slide_crop": 224, "slide_stride": 112}
    if args.model is None:
        model, weights = rfclip.testing.make_tiny_model_files(tmp / "model")
        settings["distraction_dims"] = [3, 7]
    else:
        model, weights = args.model, args.weights or "openai"
    for kv in args.setting:
        k, v = kv.split("=", 1)
        settings[k] = json.loads(v)
    cfg = JobConfig(input=str(tmp / "in"), output=str(tmp / "out"), vocabulary="sky, cloud; road; car; tree; person",
                    model=model, weights=weights, method=args.method, settings=settings,
                    shard_size=50, batch_size=args.batch_size, progress=False)

    # in-process loop
    seg = rfclip.Segmenter(**segmenter_kwargs(cfg))
    files = sorted((tmp / "in").glob("*.jpg"))
    t0 = time.perf_counter()
    for i in range(0, len(files), args.batch_size):
        imgs, sizes = [], []
        for f in files[i:i + args.batch_size]:
            rgb = decode_image(f.read_bytes())
            sizes.append(rgb.shape[:2])
            imgs.append(rfclip.images.resize_short_side(rgb, seg.settings.short_side, seg.settings.max_long_side))
        for p in seg.segment_batch(imgs, original_sizes=sizes):
            encode_label_png(p.labels, seg.num_classes)
    loop_s = time.perf_counter() - t0
    del seg

    summary = run(cfg)
    loop_ips = len(files) / loop_s
    res = {"images": len(files), "size": args.size, "model": str(model), "method": args.method,
           "in_process_loop_s": round(loop_s, 2), "in_process_images_per_s": round(loop_ips, 3),
           "ray_job_wall_s": summary["wall_time_s"], "ray_job_images_per_s": summary["images_per_second"],
           "ray_pipeline_s": summary["pipeline_time_s"],
           "ray_pipeline_images_per_s": round(len(files) / summary["pipeline_time_s"], 3),
           "ratio_end_to_end": round(summary["images_per_second"] / loop_ips, 3),
           "ratio_pipeline": round(len(files) / summary["pipeline_time_s"] / loop_ips, 3)}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
