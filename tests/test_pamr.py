"""PAMR against a per-pixel loop that follows Araslanov & Roth's definition."""
import math

import torch

from rfclip.pamr import pamr


def _loop_pamr(image, masks, iters, dilations):
    c, h, w = image.shape

    def at(x, y, xx):                                   # replicate border
        return x[:, min(max(y, 0), h - 1), min(max(xx, 0), w - 1)]

    offsets = [(dy, dx) for d in dilations for dy in (-d, 0, d) for dx in (-d, 0, d) if (dy, dx) != (0, 0)]
    weights = torch.zeros(len(offsets), h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            centre = image[:, y, x]
            window = [at(image, y + dy, x + dx) for dy, dx in offsets] + [centre] * len(dilations)
            spread = torch.stack(window, 1).std(dim=1) + 1e-8                       # (C,), 18 samples
            aff = [float((-(at(image, y + dy, x + dx) - centre).abs() / (0.1 * spread)).mean())
                   for dy, dx in offsets]
            top = max(aff)
            z = sum(math.exp(a - top) for a in aff)
            for k, a in enumerate(aff):
                weights[k, y, x] = math.exp(a - top) / z
    out = masks.double()
    for _ in range(iters):
        new = torch.zeros_like(out)
        for y in range(h):
            for x in range(w):
                for k, (dy, dx) in enumerate(offsets):
                    new[:, y, x] += weights[k, y, x] * at(out, y + dy, x + dx)
        out = new
    return out


def test_pamr_matches_the_per_pixel_definition():
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 9, 11, generator=g) * 255).double()
    masks = torch.randn(2, 9, 11, generator=g).double()
    got = pamr(image, masks, iters=2, dilations=(1, 2))
    torch.testing.assert_close(got, _loop_pamr(image, masks, 2, (1, 2)), rtol=1e-5, atol=1e-5)
