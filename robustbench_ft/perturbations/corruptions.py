"""The corruption portfolio: each test image gets exactly one of 11 common corruptions at one severity.

Portfolio as in Heuillet et al. (MaxHeuillet/robust_training @ 4c886c1 ``corruptions/common.py::
apply_portfolio_of_corruptions``): shot_noise, impulse_noise, defocus_blur, motion_blur, zoom_blur, snow,
brightness, contrast, elastic_transform, pixelate, jpeg_compression (gaussian_noise, glass_blur, frost and fog are
commented out there), assigned in contiguous blocks, image ``i`` getting ``types[(i // step) % 11]`` with
``step = max(1, n // 11)``. The corruptions are ImageNet-C's (Hendrycks & Dietterich, ICLR 2019) as generalised to
any image size by ``imagecorruptions`` (Michaelis et al. 2019); the package used is its maintained fork
``imagecorruptions-imaug`` 1.1.5 (PyPI; the original 1.1.2 fails under NumPy 2 / scikit-image ≥ 0.19 for fog and
glass blur and imports ``pkg_resources``, gone from current setuptools; the fork reads its frost images with
``importlib.resources``).

Departures: (1) the corruption is applied to the model's input image (after its resize and crop, before its
normalisation), not to the raw-resolution image before the resize as Heuillet et al. do; (2) randomness is
seeded per sample (NumPy's global generator, whose state is saved and restored, and ``impulse_noise``'s own
``seed`` argument), from the run seed and the sample's index in the test set, so a run repeats exactly —
Heuillet et al. pre-computed their corrupted set once with no seed. Images must be at least 32 px a side (the
package refuses smaller ones).
"""
from __future__ import annotations

import numpy as np

PACKAGE = "imagecorruptions-imaug"
PORTFOLIO = ("shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur", "snow", "brightness",
             "contrast", "elastic_transform", "pixelate", "jpeg_compression")
MIN_SIDE = 32


def portfolio_assignment(n: int) -> list[str]:
    """The corruption of each of ``n`` images, in contiguous blocks (see the module docstring)."""
    step = max(1, n // len(PORTFOLIO))
    return [PORTFOLIO[(i // step) % len(PORTFOLIO)] for i in range(n)]


def sample_seed(seed: int, index: int) -> int:
    """A 32-bit seed for one sample, from the run seed and the sample's index (independent streams)."""
    return int(np.random.SeedSequence([seed, index, 0xC0]).generate_state(1)[0])


def corrupt_one(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """``image`` (H×W×3 uint8) with corruption ``name`` at ``severity``, drawing its noise from ``seed``."""
    from imagecorruptions import corrupt

    state = np.random.get_state()
    try:
        np.random.seed(seed)
        extra = {"seed": seed} if name == "impulse_noise" else {}
        out = corrupt(image, severity=severity, corruption_name=name, **extra)
    finally:
        np.random.set_state(state)
    return np.ascontiguousarray(out, dtype=np.uint8)


def corrupt_portfolio(pixels: np.ndarray, indices: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """Pixels ``[N, 3, H, W]`` in [0, 1] (exact multiples of 1/255, as ToTensor makes them) -> the corrupted
    pixels, image ``k`` getting ``portfolio_assignment(N)[k]`` seeded by its test-set index ``indices[k]``."""
    if pixels.shape[-1] < MIN_SIDE or pixels.shape[-2] < MIN_SIDE:
        raise ValueError(f"the corruption shifts need images of at least {MIN_SIDE}x{MIN_SIDE} pixels (the "
                         f"imagecorruptions package refuses smaller ones); the model's input is "
                         f"{pixels.shape[-2]}x{pixels.shape[-1]}")
    images = np.rint(np.asarray(pixels) * 255).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    out = np.stack([corrupt_one(np.ascontiguousarray(img), name, severity, sample_seed(seed, int(i)))
                    for img, name, i in zip(images, portfolio_assignment(len(images)), indices)])
    return out.transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def corruption_facts(severity: int) -> dict:
    from robustbench_ft.perturbations.attack import package_version

    return {"attack": "corruption-portfolio", "severity": severity, "corruptions": ",".join(PORTFOLIO),
            "package": PACKAGE, "package_version": package_version(PACKAGE)}
