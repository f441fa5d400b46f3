"""Write a tiny RANDOM model to try the tools without pretrained weights (its masks mean nothing).

    python -m rfclip.random_model DIR
"""
from __future__ import annotations

import argparse
import sys

from .testing import make_tiny_model_files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rfclip.random_model", description=__doc__.split("\n\n")[0])
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg, weights = make_tiny_model_files(args.directory, seed=args.seed, plant=True)
    print(f"random tiny model (distractors planted in channels 0-7):\n  --model {cfg} --weights {weights}\n"
          f"for rfclip / rfclip-release also pass: --setting 'distraction_dims=[0,1,2,3,4,5,6,7]'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
