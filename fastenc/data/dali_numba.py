"""DINO's per-crop color and filter augmentations as one fused CPU kernel, run inside DALI (numba plugin).

Why. On DALI's CPU backend the per-pixel operators (color_twist, hsv, gaussian_blur, arithmetic) cost 20-40 ns
per pixel; with 12 crops per image they made DALI-cpu multi-crop no faster than PIL. This kernel does, per crop,
in one pass over a float buffer: the color jitter with torchvision's semantics (brightness, contrast around the
mean gray level, saturation, HSV hue shift, in a random order, clamped after each), grayscale, Gaussian blur
(separable, sigma in pixels, edges clamped, as Pillow), solarize (>= 128 inverted), the horizontal flip, and the
uint8 CHW output (rounded, as Pillow's ops round; normalized later on the device, fastenc.data.spec). DALI keeps
the decode, the random resized crops and the random draws; the GPU pipeline uses DALI's own GPU operators instead
(fastenc.data.dali).

The kernel is plain Python over numpy arrays: numba compiles it for DALI (once per process, ~5 s with its disk
cache warm), and the tests call it directly to compare every step with torchvision's functional ops
(tests/data/test_dali.py).

Per-crop parameters (one float32 row of NUM_PARAMS):
    0 flip   1 jitter   2 brightness   3 contrast   4 saturation   5 hue (turns)   6 order (0..23, a permutation
    of the four jitter ops)   7 gray   8 blur sigma (0: none)   9 solarize
"""

from __future__ import annotations

import functools

import numpy as np

NUM_PARAMS = 10
P_FLIP, P_JITTER, P_BRIGHT, P_CONTRAST, P_SAT, P_HUE, P_ORDER, P_GRAY, P_SIGMA, P_SOLARIZE = range(NUM_PARAMS)
MAX_BLUR_RADIUS = 64  # taps per side; sigma up to ~21 px


def _permutation(code):
    """The code-th permutation of (0, 1, 2, 3) in the factorial number system (0 <= code < 24)."""
    items = [0, 1, 2, 3]
    out = [0, 0, 0, 0]
    c = code
    for i in range(4):
        f = 1
        for k in range(1, 4 - i):
            f *= k
        j = c // f
        c = c % f
        out[i] = items[j]
        items.pop(j)
    return out


def _blend_gray(buf, factor, use_mean, row):
    """factor * img + (1 - factor) * gray, clamped to [0, 1]: gray per pixel (saturation, grayscale) or the
    image's mean gray level (contrast), with torchvision's luma weights. Row loops so that LLVM vectorizes them."""
    C, H, W = buf.shape
    mean = 0.0
    if use_mean:
        for y in range(H):
            for x in range(W):
                mean += 0.2989 * buf[0, y, x] + 0.587 * buf[1, y, x] + 0.114 * buf[2, y, x]
        mean /= H * W
    keep = 1.0 - factor
    for y in range(H):
        if use_mean:
            for x in range(W):
                row[x] = keep * mean
        else:
            for x in range(W):
                row[x] = keep * (0.2989 * buf[0, y, x] + 0.587 * buf[1, y, x] + 0.114 * buf[2, y, x])
        for c in range(3):
            for x in range(W):
                buf[c, y, x] = min(max(factor * buf[c, y, x] + row[x], 0.0), 1.0)


def _shift_hue(buf, shift):
    """RGB -> HSV, h += shift (mod 1), -> RGB, as torchvision's adjust_hue on a float image; branch-free.

    Back to RGB with the closed form channel(n) = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6, with
    n = 5, 3, 1 for R, G, B (equal to the six-sector table).
    """
    C, H, W = buf.shape
    for y in range(H):
        for x in range(W):
            r = buf[0, y, x]
            g = buf[1, y, x]
            b = buf[2, y, x]
            maxc = max(r, max(g, b))
            minc = min(r, min(g, b))
            delta = maxc - minc
            safe = delta if delta > 0.0 else 1.0
            sat = delta / maxc if maxc > 0.0 else 0.0
            rc = (maxc - r) / safe
            gc = (maxc - g) / safe
            bc = (maxc - b) / safe
            h = 4.0 + gc - rc
            h = 2.0 + rc - bc if g == maxc else h
            h = bc - gc if r == maxc else h
            h6 = h + 6.0 * shift
            h6 = h6 - 6.0 * np.floor(h6 / 6.0)
            vs = maxc * sat
            k = 5.0 + h6
            k = k - 6.0 if k >= 6.0 else k
            buf[0, y, x] = maxc - vs * min(max(min(k, 4.0 - k), 0.0), 1.0)
            k = 3.0 + h6
            k = k - 6.0 if k >= 6.0 else k
            buf[1, y, x] = maxc - vs * min(max(min(k, 4.0 - k), 0.0), 1.0)
            k = 1.0 + h6
            k = k - 6.0 if k >= 6.0 else k
            buf[2, y, x] = maxc - vs * min(max(min(k, 4.0 - k), 0.0), 1.0)


def _gaussian_taps(sigma):
    radius = min(int(np.ceil(3.0 * sigma)), MAX_BLUR_RADIUS)
    taps = np.empty(2 * radius + 1, np.float32)
    total = 0.0
    for k in range(-radius, radius + 1):
        w = np.exp(-0.5 * (k / sigma) ** 2)
        taps[k + radius] = w
        total += w
    for k in range(2 * radius + 1):
        taps[k] /= total
    return taps, radius


def _blur(buf, tmp, sigma, line):
    """Separable Gaussian blur (taps to 3 sigma), edge pixels repeated (Pillow's border); tap-outer loops so that
    the inner loops run over contiguous x and vectorize."""
    C, H, W = buf.shape
    taps, radius = _gaussian_taps(sigma)
    for c in range(C):
        for y in range(H):
            for x in range(radius):
                line[x] = buf[c, y, 0]
                line[radius + W + x] = buf[c, y, W - 1]
            for x in range(W):
                line[radius + x] = buf[c, y, x]
            for x in range(W):
                tmp[c, y, x] = 0.0
            for k in range(2 * radius + 1):
                t = taps[k]
                for x in range(W):
                    tmp[c, y, x] += t * line[x + k]
        for y in range(H):
            for x in range(W):
                buf[c, y, x] = 0.0
            for k in range(2 * radius + 1):
                t = taps[k]
                yy = min(max(y + k - radius, 0), H - 1)
                for x in range(W):
                    buf[c, y, x] += t * tmp[c, yy, x]


def augment_crop(out, img, p, buf, tmp, line):
    """One crop: img [H, W, 3] uint8, p [NUM_PARAMS] -> out [3, H, W] uint8."""
    H, W, _ = img.shape
    for y in range(H):
        for x in range(W):
            for c in range(3):
                buf[c, y, x] = img[y, x, c] * (1.0 / 255.0)
    if p[P_JITTER] > 0.5:
        for op in _permutation(int(p[P_ORDER])):
            if op == 0:  # brightness: blend with black
                bright = p[P_BRIGHT]
                for c in range(3):
                    for y in range(H):
                        for x in range(W):
                            buf[c, y, x] = min(buf[c, y, x] * bright, 1.0)
            elif op == 1:
                _blend_gray(buf, p[P_CONTRAST], True, line)
            elif op == 2:
                _blend_gray(buf, p[P_SAT], False, line)
            else:
                _shift_hue(buf, p[P_HUE])
    if p[P_GRAY] > 0.5:
        _blend_gray(buf, 0.0, False, line)
    if p[P_SIGMA] > 0.0:
        _blur(buf, tmp, p[P_SIGMA], line)
    solarize = p[P_SOLARIZE] > 0.5
    flip = p[P_FLIP] > 0.5
    threshold = 128.0 / 255.0
    for c in range(3):
        for y in range(H):
            for x in range(W):
                v = buf[c, y, W - 1 - x if flip else x]
                if solarize and v >= threshold:
                    v = 1.0 - v
                out[c, y, x] = np.uint8(min(max(v * 255.0 + 0.5, 0.0), 255.0))  # round half up, as Pillow


def augment_crops(out, crops, params):
    """DALI run_fn, one sample: crops [N, H, W, 3] uint8, params [N, NUM_PARAMS] -> out [N, 3, H, W] uint8."""
    N, H, W, _ = crops.shape
    buf = np.empty((3, H, W), np.float32)
    tmp = np.empty((3, H, W), np.float32)
    line = np.empty(W + 2 * MAX_BLUR_RADIUS + 1, np.float32)
    for n in range(N):
        augment_crop(out[n], crops[n], params[n], buf, tmp, line)


def augment_crops_setup(outs, ins):
    """DALI setup_fn: output [N, 3, H, W] for input [N, H, W, 3]."""
    for i in range(len(outs[0])):
        outs[0][i][0] = ins[0][i][0]
        outs[0][i][1] = 3
        outs[0][i][2] = ins[0][i][1]
        outs[0][i][3] = ins[0][i][2]


@functools.lru_cache(maxsize=None)
def dali_op():
    """The DALI numba operator, compiled once per process (numba's compile takes seconds; pipelines share it)."""
    from fastenc.utils.optional import require

    require("numba", "DALI-cpu multi-crop augmentation (pip install numba)")
    import numba
    import nvidia.dali.types as types
    from nvidia.dali.plugin.numba.experimental import NumbaFunction

    # The DALI plugin njit-compiles run_fn; its callees must be numba functions too. They are cached on disk
    # (numba's cache, next to this file or in the user's cache dir), which halves the per-process compile (~10 s ->
    # ~5 s, the rest is the plugin's own wrapper); where no cache location is writable they compile uncached.
    g = globals()
    for name in ("_permutation", "_blend_gray", "_shift_hue", "_gaussian_taps", "_blur", "augment_crop"):
        if not isinstance(g[name], numba.core.registry.CPUDispatcher):
            try:
                g[name] = numba.njit(cache=True)(g[name])
            except RuntimeError:  # "cannot cache function ...: no locator available"
                g[name] = numba.njit(g[name])
    return NumbaFunction(run_fn=augment_crops, setup_fn=augment_crops_setup, out_types=[types.UINT8],
                         in_types=[types.UINT8, types.FLOAT], outs_ndim=[4], ins_ndim=[4, 2], device="cpu")
