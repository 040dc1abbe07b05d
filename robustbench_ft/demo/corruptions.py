"""MNIST-C corruptions (Mu & Gilmer 2019, arXiv:1906.02337), in plain numpy/scipy.

The 15 corruption types of MNIST-C, each at the single severity MNIST-C publishes, so that the
demo suite's ``mnist-c`` shift has the same character as the published benchmark without its
heavy dependencies (ImageMagick, OpenCV, scikit-image). Every function maps a 28x28 uint8 image in
MNIST polarity (bright digit on black) to a new uint8 image of the same shape, and draws all of its
randomness from the ``rng`` it is given, so a dataset built from them is reproducible bit for bit.

Where this module departs from the reference code it says so in the function's docstring; the
departures keep each corruption's effect (what it destroys in the digit) while making it
vectorised or dependency-free.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]

_SIZE = 28
_CENTRE = (_SIZE - 1) / 2.0  # 13.5: pixel centres run 0..27


def _to_unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _random_sign(rng: np.random.Generator) -> float:
    return float(rng.choice((-1.0, 1.0)))


def _affine(x: np.ndarray, matrix: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Warps ``x`` about the image centre: output pixel ``p`` samples the input at ``M (p - c) + c - shift``.

    Coordinates are (row, col); sampling is bilinear and pixels from outside the image are black.
    """
    centre = np.array([_CENTRE, _CENTRE])
    offset = centre - matrix @ centre - np.asarray(shift)
    out = ndimage.affine_transform(_to_unit(x), matrix, offset=offset, order=1, mode="constant", cval=0.0)
    return _to_uint8(out)


def _line_mask(c0: float, r0: float, c1: float, r1: float) -> np.ndarray:
    """Intensity in [0, 1] of an anti-aliased line from (row r0, col c0) to (row r1, col c1).

    As in MNIST-C, the profile is ``1 + log(1 - d / 2.3)`` of the vertical distance ``d`` to the
    line (about 1.5 px wide), and the line is cut to the columns it spans.
    """
    if c1 == c0:
        return np.zeros((_SIZE, _SIZE))
    rows, cols = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float64)
    slope = (r1 - r0) / (c1 - c0)
    dist = np.minimum(np.abs(rows - (r0 + slope * (cols - c0))), 2.3 - 1e-9)
    mask = np.clip(1.0 + np.log(1.0 - dist / 2.3), 0.0, 1.0)
    lo, hi = sorted((c0, c1))
    mask[:, (cols[0] < np.floor(lo)) | (cols[0] >= np.ceil(hi))] = 0.0
    return mask


def _plasma_fractal(rng: np.random.Generator, size: int = 32, roughness: float = 1.4) -> np.ndarray:
    """A cloud texture in [0, 1] by the diamond-square algorithm on a periodic ``size`` x ``size`` grid.

    At each halving of the step the added noise shrinks by ``roughness**2`` (the effective decay of
    MNIST-C's implementation). MNIST-C crops a 256-pixel map; a 32-pixel one has the same texture
    at the crop's scale and costs 64x less.
    """
    grid = np.zeros((size, size))
    step, amplitude = size, 1.0
    while step >= 2:
        half = step // 2
        corners = grid[0::step, 0::step]
        right, below = np.roll(corners, -1, axis=1), np.roll(corners, -1, axis=0)
        square = (corners + right + below + np.roll(below, -1, axis=1)) / 4.0
        grid[half::step, half::step] = square + rng.uniform(-amplitude, amplitude, square.shape)
        centres = grid[half::step, half::step]
        top = (corners + right + centres + np.roll(centres, 1, axis=0)) / 4.0
        grid[0::step, half::step] = top + rng.uniform(-amplitude, amplitude, top.shape)
        left = (corners + below + centres + np.roll(centres, 1, axis=1)) / 4.0
        grid[half::step, 0::step] = left + rng.uniform(-amplitude, amplitude, left.shape)
        step, amplitude = half, amplitude / roughness**2
    grid -= grid.min()
    return grid / grid.max()


# --------------------------------------------------------------------------- noise


def shot_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson photon noise with 3 photons at full brightness (MNIST-C severity 5)."""
    photons = 3.0
    return _to_uint8(rng.poisson(_to_unit(x) * photons) / photons)


def impulse_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise on 17% of the pixels (MNIST-C severity 4)."""
    out = _to_unit(x)
    hit = rng.random(out.shape) < 0.17
    salt = rng.random(out.shape) < 0.5
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return _to_uint8(out)


# --------------------------------------------------------------------------- blur


def glass_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, locally scramble pixels, blur again (sigma 0.7, 1-pixel moves, 2 rounds; MNIST-C severity 1).

    MNIST-C swaps pixel pairs one by one in a Python loop; here each pixel, with probability 1/2,
    takes the value of a random neighbour, in one vectorised gather per round.
    """
    sigma, max_delta, rounds = 0.7, 1, 2
    out = ndimage.gaussian_filter(_to_unit(x), sigma, mode="nearest")
    rows, cols = np.mgrid[0:_SIZE, 0:_SIZE]
    for _ in range(rounds):
        moved = rng.random(out.shape) < 0.5
        dr, dc = rng.integers(-max_delta, max_delta + 1, size=(2, *out.shape)) * moved
        out = out[np.clip(rows + dr, 0, _SIZE - 1), np.clip(cols + dc, 0, _SIZE - 1)]
    return _to_uint8(ndimage.gaussian_filter(out, sigma, mode="nearest"))


def motion_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One-sided motion blur, radius 10 and sigma 3, at a random angle in [-45, 45] degrees (MNIST-C severity 1).

    Same kernel as ImageMagick's ``-motion-blur`` used by MNIST-C: Gaussian weights placed along
    a ray from the pixel, so the digit is smeared in one direction.
    """
    radius, sigma = 10, 3.0
    angle = np.deg2rad(rng.uniform(-45.0, 45.0))
    kernel = np.zeros((2 * radius + 1, 2 * radius + 1))
    for step in range(radius + 1):
        r = radius + int(round(step * np.sin(angle)))
        c = radius + int(round(step * np.cos(angle)))
        kernel[r, c] += np.exp(-(step**2) / (2.0 * sigma**2))
    kernel /= kernel.sum()
    return _to_uint8(ndimage.correlate(_to_unit(x), kernel, mode="constant", cval=0.0))


# --------------------------------------------------------------------------- geometry


def shear(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal shear by 0.4 in a random direction, about the image centre (MNIST-C severity 2)."""
    s = 0.4 * _random_sign(rng)
    return _affine(x, np.array([[1.0, 0.0], [s, 1.0]]))


def scale(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:  # noqa: ARG001  (deterministic)
    """Shrinks the digit to 70% about the image centre (MNIST-C severity 3)."""
    return _affine(x, np.eye(2) / 0.7)


def rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation by 0.4 rad (about 23 degrees) in a random direction (MNIST-C severity 2)."""
    a = 0.4 * _random_sign(rng)
    return _affine(x, np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]))


def translate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift by 3 pixels along each axis, in random directions (MNIST-C severity 3)."""
    shift = (3.0 * _random_sign(rng), 3.0 * _random_sign(rng))
    return _affine(x, np.eye(2), shift)


# --------------------------------------------------------------------------- photometric


def brightness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:  # noqa: ARG001  (deterministic)
    """Adds 0.5 to every pixel (MNIST-C severity 5; for grey images its HSV round trip is this addition)."""
    return _to_uint8(_to_unit(x) + 0.5)


def stripe(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:  # noqa: ARG001  (deterministic)
    """Inverts the left and right quarters of the image (columns 0-6 and 21-27)."""
    out = np.array(x, dtype=np.uint8, copy=True)
    out[:, :7] = 255 - out[:, :7]
    out[:, 21:] = 255 - out[:, 21:]
    return out


def fog(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Adds a fractal cloud of weight 3, then rescales so the digit's peak keeps its relative level (MNIST-C severity 5)."""
    weight = 3.0
    out = _to_unit(x)
    peak = out.max()
    out = out + weight * _plasma_fractal(rng)[:_SIZE, :_SIZE]
    return _to_uint8(out * peak / (peak + weight))


def spatter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mud spatter: blobs of grey (63/255) from thresholded smoothed noise occlude the digit (MNIST-C severity 4)."""
    liquid = ndimage.gaussian_filter(rng.normal(0.65, 0.3, size=(_SIZE, _SIZE)), 1.0, mode="nearest")
    mask = ndimage.gaussian_filter((liquid > 0.65).astype(np.float64), 1.5, mode="nearest")
    mask[mask < 0.8] = 0.0
    return _to_uint8(_to_unit(x) * (1.0 - mask) + (63.0 / 255.0) * mask)


def canny_edges(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:  # noqa: ARG001  (deterministic)
    """Replaces the digit by its Canny edge map (sigma 1, hysteresis thresholds 0.1 and 0.2).

    Implemented here (Gaussian smoothing, Sobel gradient, non-maximum suppression along the
    gradient quantised to 4 directions, 8-connected hysteresis) because MNIST-C's scikit-image
    is not a dependency of the harness.
    """
    smooth = ndimage.gaussian_filter(_to_unit(x), 1.0, mode="constant")
    gy, gx = ndimage.sobel(smooth, axis=0), ndimage.sobel(smooth, axis=1)
    magnitude = np.hypot(gx, gy)
    direction = np.round(np.mod(np.arctan2(gy, gx), np.pi) / (np.pi / 4)).astype(int) % 4
    padded = np.pad(magnitude, 1)
    # (row, col) step along the gradient for directions 0, 45, 90, 135 degrees
    steps = ((0, 1), (1, 1), (1, 0), (1, -1))
    is_max = np.zeros(magnitude.shape, dtype=bool)
    for d, (dr, dc) in enumerate(steps):
        ahead = padded[1 + dr:1 + dr + _SIZE, 1 + dc:1 + dc + _SIZE]
        behind = padded[1 - dr:1 - dr + _SIZE, 1 - dc:1 - dc + _SIZE]
        is_max |= (direction == d) & (magnitude >= ahead) & (magnitude >= behind)
    thin = np.where(is_max, magnitude, 0.0)
    labels, count = ndimage.label(thin >= 0.1, structure=np.ones((3, 3)))
    strong = np.unique(labels[thin >= 0.2])
    edges = np.isin(labels, strong[strong > 0]) if count else np.zeros_like(thin, dtype=bool)
    return edges.astype(np.uint8) * 255


# --------------------------------------------------------------------------- occluding lines


def dotted_line(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A dashed line (2-pixel dashes) across the whole image between two random heights."""
    r0, r1 = rng.integers(0, _SIZE - 1, size=2)
    line = _line_mask(0.0, float(r0), float(_SIZE - 1), float(r1))
    gaps = (np.arange(_SIZE) // 2) % 2 == 0
    line[:, gaps] = 0.0
    return _to_uint8(_to_unit(x) + line)


def zigzag(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A zigzag (2-pixel teeth) from column 2 to column 25 at a random height and slant."""
    tooth, amplitude = 2.0, 2.0
    c0, c1 = 2.0, 25.0
    r0 = float(rng.integers(0, _SIZE - 1))
    r1 = r0 + float(rng.integers(-5, 5))
    theta = np.arctan2(r1 - r0, c1 - c0)
    length = np.hypot(c1 - c0, r1 - r0)
    # vertices in the line's own frame: along-line positions a, 3a, 5a, ... alternating +-amplitude
    along = np.arange(tooth, length, 2 * tooth)
    across = amplitude * (-1.0) ** np.arange(along.size)
    along, across = np.concatenate(([0.0], along, [length])), np.concatenate(([0.0], across, [0.0]))
    cols = c0 + along * np.cos(theta) - across * np.sin(theta)
    rows = r0 + along * np.sin(theta) + across * np.cos(theta)
    out = _to_unit(x)
    for i in range(1, cols.size):
        out = np.clip(out + _line_mask(cols[i - 1], rows[i - 1], cols[i], rows[i]), 0.0, 1.0)
    return _to_uint8(out)


CORRUPTIONS: dict[str, Corruption] = {
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "shear": shear,
    "scale": scale,
    "rotate": rotate,
    "brightness": brightness,
    "translate": translate,
    "stripe": stripe,
    "fog": fog,
    "spatter": spatter,
    "dotted_line": dotted_line,
    "zigzag": zigzag,
    "canny_edges": canny_edges,
}
"""The 15 MNIST-C corruptions, in the paper's order; the ``mnist-c`` dataset cycles through them by index."""
