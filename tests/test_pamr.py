"""PAMR against a per-pixel loop that follows Araslanov & Roth's definition."""
import math

import pytest
import torch
import torch.nn.functional as F

from rfclip.pamr import pamr, pamr_row_bands


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


@pytest.mark.parametrize("iters,dilations,hw,size", [(2, (1, 2), (9, 7), (41, 13)), (10, (8, 16), (60, 8), (410, 30))])
def test_pamr_in_row_bands_equals_the_whole_image(iters, dilations, hw, size):
    """Bands with a halo of ``iters * max(dilations)`` rows give the whole image's refinement; the
    logits and the guide are resized to ``size`` on the way, as ``Segmenter`` passes them."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, *hw, generator=g)
    image = (torch.rand(3, 2 * hw[0], 2 * hw[1], generator=g) * 255).round().to(torch.uint8)
    up = lambda x: F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    whole = pamr(up(image), up(logits), iters, dilations)
    halo = iters * max(dilations)
    for max_bytes in (None, 1):                      # one band; bands of one halo's height each
        bands = list(pamr_row_bands(logits, image, size, max_bytes, iters, dilations))
        assert [r0 for r0, _, _ in bands] == ([0] if max_bytes is None else list(range(0, size[0], halo)))
        assert len(bands) >= (1 if max_bytes is None else 3)
        got = torch.cat([b for _, _, b in bands], dim=1)
        # the resize's source positions agree with PyTorch's to an ulp; the guide's 0-255 scale makes that 1e-5
        torch.testing.assert_close(got, whole, rtol=0, atol=1e-4)


def test_pamr_memory_is_a_few_copies_of_the_masks_not_one_per_neighbour():
    """Peak RSS of one refinement of 120 MB of masks (30 names, 1 MP), in a fresh process: about 3 copies of
    the masks and 16 planes of weights (690 MB when measured), where a stack of the 16 neighbours took 4.1 GB."""
    import subprocess
    import sys

    script = """
import resource, torch
from rfclip.pamr import pamr
torch.set_num_threads(1)
image, masks = torch.rand(3, 1000, 1000) * 255, torch.randn(30, 1000, 1000)
torch.zeros(30, 1000, 1000).add_(1)                  # warm the allocator and the kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pamr(image, masks, iters=2)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    grown = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    masks_bytes = 30 * 1000 * 1000 * 4
    assert grown < 12 * masks_bytes, f"PAMR took {grown / 2**20:.0f} MB for {masks_bytes / 2**20:.0f} MB of masks"
