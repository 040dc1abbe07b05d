"""Procedural digit images and captions: the pretraining corpus of the demo model and the print-style shifts.

Every image is made in two steps: an *ink mask* (a grayscale glyph in [0, 1], from a font or from a
hand-drawn-like stroke skeleton, with geometric and blur/elastic augmentation) and a *colouring*
(foreground and background colour, noise).  Keeping the two apart lets the pretraining loop store
only compact masks and colour the batch on the fly, while ``render_digit`` gives other modules the
same images as PIL RGB pictures.  All randomness comes from a caller-supplied numpy ``Generator``,
so a corpus is a pure function of its seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from scipy.ndimage import center_of_mass, gaussian_filter, map_coordinates, shift

from robustbench_ft.demo.digits import DIGIT_CLASSNAMES

_HI = 96  # side of the canvas the glyph is drawn on before being shrunk: antialiasing and thin strokes

# Named colours: the captions mention them, so the text tower can learn that colour is not the class.
COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15), "white": (245, 245, 245), "gray": (128, 128, 128), "red": (210, 40, 40),
    "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (235, 210, 40), "orange": (240, 140, 30),
    "purple": (130, 50, 170), "brown": (120, 75, 40), "pink": (240, 150, 190), "cyan": (60, 200, 220),
}
_DARK = ("black", "blue", "purple", "brown", "red", "green", "gray")
_LIGHT = ("white", "yellow", "cyan", "pink", "orange", "gray")

# Hand-drawn-like skeletons: per digit a list of strokes, each a polyline in a unit box (x right, y down).


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 16) -> list[tuple[float, float]]:
    t = np.radians(np.linspace(a0, a1, n))
    return [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in t]


_SKELETONS: dict[int, list[list[list[tuple[float, float]]]]] = {
    # each digit has one or more variants; each variant is a list of strokes
    0: [[_arc(0.5, 0.5, 0.32, 0.45, -90, 275, 28)]],
    1: [[[(0.5, 0.05), (0.5, 0.95)]],
        [[(0.3, 0.25), (0.52, 0.05), (0.52, 0.95)]],
        [[(0.3, 0.25), (0.52, 0.05), (0.52, 0.95)], [(0.3, 0.95), (0.74, 0.95)]]],
    2: [[_arc(0.5, 0.32, 0.3, 0.27, 200, 380, 12) + [(0.78, 0.42), (0.2, 0.95), (0.85, 0.95)]],
        [_arc(0.5, 0.32, 0.3, 0.27, 190, 370, 12) + [(0.6, 0.65), (0.2, 0.93)]
         + _arc(0.35, 0.85, 0.14, 0.1, 270, 360, 6)[1:] + [(0.85, 0.93)]]],
    3: [[_arc(0.5, 0.28, 0.28, 0.23, 200, 450, 14), _arc(0.5, 0.72, 0.3, 0.24, 270, 520, 14)]],
    4: [[[(0.62, 0.05), (0.15, 0.65), (0.88, 0.65)], [(0.65, 0.35), (0.65, 0.95)]],
        [[(0.25, 0.05), (0.2, 0.55), (0.85, 0.55)], [(0.7, 0.1), (0.7, 0.95)]]],
    5: [[[(0.8, 0.07), (0.3, 0.07), (0.25, 0.45)] + _arc(0.5, 0.67, 0.3, 0.26, 225, 495, 16)[1:]]],
    6: [[_arc(0.55, 0.55, 0.35, 0.5, 290, 185, 12) + _arc(0.5, 0.72, 0.3, 0.23, 180, 540, 20)[1:]]],
    7: [[[(0.15, 0.07), (0.85, 0.07), (0.4, 0.95)]],
        [[(0.15, 0.07), (0.85, 0.07), (0.4, 0.95)], [(0.35, 0.5), (0.75, 0.5)]],
        [[(0.2, 0.2), (0.2, 0.07), (0.85, 0.07), (0.5, 0.95)]]],
    8: [[_arc(0.5, 0.28, 0.24, 0.22, 90, 450, 20), _arc(0.5, 0.72, 0.3, 0.24, -90, 270, 20)]],
    9: [[_arc(0.47, 0.3, 0.28, 0.24, 0, 360, 20), [(0.75, 0.3), (0.72, 0.95)]],
        [_arc(0.47, 0.3, 0.28, 0.24, 0, 360, 20), [(0.75, 0.3), (0.7, 0.65), (0.5, 0.95)]]],
}


@dataclass
class Rendering:
    """One procedurally drawn digit: its ink mask in [0, 1] and the attributes that captions describe."""

    mask: np.ndarray  # (size, size) float32, 1 = ink
    attributes: dict[str, object] = field(default_factory=dict)


@lru_cache(maxsize=512)
def _font(path: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, px)


def _font_glyph(digit: int, font_path: Path, rng: np.random.Generator, plain: bool) -> tuple[Image.Image, dict]:
    """The digit in a font on a _HI×_HI canvas (white ink on black), with stroke-width variation."""
    px = int(_HI * (rng.uniform(0.62, 0.72) if plain else rng.uniform(0.5, 0.8)))
    stroke = 0 if plain else int(rng.choice([0, 0, 0, 1, 2, 3, 4, 5]))
    canvas = Image.new("L", (_HI, _HI), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((_HI / 2, _HI / 2), str(digit), fill=255, font=_font(str(font_path), px), anchor="mm",
              stroke_width=stroke, stroke_fill=255)
    name = Path(font_path).stem.lower()
    weight = "bold" if (stroke >= 3 or "bol" in name) else ("thin" if stroke == 0 and "bol" not in name else "regular")
    return canvas, {"kind": "print", "weight": weight,
                    "slant": "italic" if ("oblique" in name or "ita" in name) else "upright"}


def _stroke_glyph(digit: int, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """A hand-drawn-like digit: a skeleton with a random affine warp, wobbly points and a variable pen."""
    variants = _SKELETONS[digit]
    strokes = variants[int(rng.integers(len(variants)))]
    shear, rot = rng.uniform(-0.45, 0.25), np.radians(rng.uniform(-12, 12))
    sx, sy = rng.uniform(0.55, 1.0), rng.uniform(0.85, 1.1)
    affine = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]]) @ np.array([[sx, shear], [0, sy]])
    wobble = rng.uniform(0.005, 0.035)
    pen = int(rng.integers(5, 16))
    canvas = Image.new("L", (_HI, _HI), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in strokes:
        pts = np.asarray(stroke, dtype=np.float64) - 0.5
        pts = pts + gaussian_filter(rng.normal(0, wobble, pts.shape), sigma=(1.5, 0)) * 3
        pts = pts @ affine.T * (_HI * 0.62) + _HI / 2
        xy = [tuple(p) for p in pts]
        draw.line(xy, fill=255, width=pen, joint="curve")
        r = pen / 2 - 0.5  # round pen caps
        for x, y in (xy[0], xy[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    weight = "bold" if pen >= 12 else ("thin" if pen <= 7 else "regular")
    return canvas, {"kind": "handwritten", "weight": weight, "slant": "italic" if shear < -0.2 else "upright"}


def _elastic(mask: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """Simard-style elastic distortion: smooth random displacement field, as in handwriting augmentation."""
    h, w = mask.shape
    dx = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    dy = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return map_coordinates(mask, [yy + dy, xx + dx], order=1, mode="constant")


def _fit_box(glyph: Image.Image, box: int, size: int) -> np.ndarray:
    """Crop to the ink, scale the longer side to ``box`` px, centre by mass on a size×size canvas (MNIST's layout)."""
    bbox = glyph.getbbox()
    if bbox is None:
        return np.zeros((size, size), np.float32)
    crop = glyph.crop(bbox)
    scale = box / max(crop.size)
    new = (max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale)))
    small = np.asarray(crop.resize(new, Image.LANCZOS), np.float32) / 255.0
    out = np.zeros((size, size), np.float32)
    y0, x0 = (size - new[1]) // 2, (size - new[0]) // 2
    out[y0:y0 + new[1], x0:x0 + new[0]] = small
    cy, cx = center_of_mass(out)
    return shift(out, ((size - 1) / 2 - cy, (size - 1) / 2 - cx), order=1, mode="constant")


def sample_rendering(digit: int, font_path: Path | None, rng: np.random.Generator, *, size: int = 28,
                     style: str = "random") -> Rendering:
    """Draw one digit as an ink mask; ``font_path=None`` draws a hand-drawn-like stroke digit instead.

    ``style="plain"`` is upright, centred print with mild size variation (the held-out-font shift);
    ``style="random"`` adds rotation, scale, position, stroke width, blur and elastic distortion.
    """
    if style not in ("random", "plain"):
        raise ValueError(f"style must be 'random' or 'plain', got {style!r}")
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    plain = style == "plain"
    if font_path is None:
        glyph, attrs = _stroke_glyph(digit, rng)
    else:
        glyph, attrs = _font_glyph(digit, font_path, rng, plain)
    if plain:
        mask = _fit_box(glyph, int(round(size * rng.uniform(0.64, 0.78))), size)
        attrs.update(size="medium", position="centred", blur=False)
        return Rendering(np.clip(mask, 0, 1).astype(np.float32), attrs)
    glyph = glyph.rotate(float(rng.normal(0, 10)), resample=Image.BILINEAR)
    rel = rng.uniform(0.4, 0.92)
    mask = _fit_box(glyph, int(round(size * rel)), size)
    attrs["size"] = "small" if rel < 0.55 else ("large" if rel > 0.8 else "medium")
    max_off = max(0.0, (size * (1 - rel)) / 2 - 1)
    if rng.random() < 0.5:  # off-centre placement half of the time
        off = rng.uniform(-max_off, max_off, 2)
        mask = shift(mask, off, order=1, mode="constant")
        attrs["position"] = "off-centre" if np.abs(off).max() > 2.5 else "centred"
    else:
        attrs["position"] = "centred"
    if rng.random() < 0.4:
        mask = _elastic(mask, rng, alpha=rng.uniform(1.0, 3.0), sigma=rng.uniform(2.5, 4.0))
    if rng.random() < 0.25:  # thicken (dilate) or thin (erode) the ink
        img = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8))
        img = img.filter(ImageFilter.MaxFilter(3) if rng.random() < 0.6 else ImageFilter.MinFilter(3))
        mask = np.asarray(img, np.float32) / 255.0
    blur = rng.random() < 0.3
    if blur:
        mask = gaussian_filter(mask, rng.uniform(0.6, 1.3))
    attrs["blur"] = bool(blur)
    return Rendering(np.clip(mask, 0, 1).astype(np.float32), attrs)


def sample_colours(rng: np.random.Generator) -> dict[str, str]:
    """Foreground/background colour names: half dark-on-light, half light-on-dark, mostly gray-scale.

    Both polarities matter: MNIST is white on black, print is black on white, and a model pretrained
    on one polarity only would fail the other in zero-shot.
    """
    light_on_dark = rng.random() < 0.5
    mono = rng.random() < 0.6
    if light_on_dark:
        fg = "white" if mono else str(rng.choice(_LIGHT))
        bg = "black" if mono or rng.random() < 0.5 else str(rng.choice([c for c in _DARK if c != fg]))
    else:
        fg = "black" if mono else str(rng.choice(_DARK))
        bg = "white" if mono or rng.random() < 0.5 else str(rng.choice([c for c in _LIGHT if c != fg]))
    return {"fg": fg, "bg": bg}


def colourise(mask, fg, bg):
    """``bg + (fg - bg) * mask``: works on numpy arrays and torch tensors alike (mask broadcast over RGB)."""
    return bg + (fg - bg) * mask


def render_digit(digit: int, font_path: Path | None, rng: np.random.Generator, *, size: int = 28,
                 style: str = "random") -> Image.Image:
    """A digit as an RGB PIL image; ``style="plain"`` is black print on white, ``"random"`` adds colour and noise."""
    r = sample_rendering(digit, font_path, rng, size=size, style=style)
    colours = {"fg": "black", "bg": "white"} if style == "plain" else sample_colours(rng)
    fg = np.asarray(COLOURS[colours["fg"]], np.float32)
    bg = np.asarray(COLOURS[colours["bg"]], np.float32)
    rgb = colourise(r.mask[..., None], fg, bg)
    if style == "random":
        rgb = rgb + rng.normal(0, rng.uniform(0, 20), rgb.shape)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


_NUMERAL_FORMS = ("{n}", "the number {n}", "the digit {n}", "a {n}", "number {n}", "digit {n}", "the numeral {n}")
_CAPTION_TEMPLATES = (
    "a photo of {d}.", "an image of {d}.", "a picture of {d}.", "{d}.", "a drawing of {d}.",
    "{d} written on a page.", "a close-up of {d}.", "{D} {ink}.", "{d} {ink}.", "a {adj} {n}.",
    "{D} on a {bg} background.", "a {adj} {n} on a {bg} background.", "a {fg} {n} on {bg}.",
    "{d}, {kind}.", "a {kind} {n}.", "{D} in {fg} ink.", "a scan of {d}.", "{D}, {size} and {pos}.",
    "a low resolution image of {d}.", "a {size} {n}.", "{d} in a {fontword} font.", "a sketch of {d}.",
)


def make_caption(digit: int, attributes: dict[str, object], rng: np.random.Generator) -> str:
    """A varied English caption for a rendering, naming the digit as a word or a numeral.

    ``attributes`` are those of ``sample_rendering`` plus ``fg``/``bg`` colour names (missing keys fall
    back to neutral words).  Every caption names the digit exactly once, so it is the only stable signal.
    """
    word = DIGIT_CLASSNAMES[digit]
    n = word if rng.random() < 0.55 else str(digit)
    d = str(rng.choice(_NUMERAL_FORMS)).format(n=n)
    fg, bg = str(attributes.get("fg", "black")), str(attributes.get("bg", "white"))
    kind = "handwritten" if attributes.get("kind") == "handwritten" else "printed"
    weight = str(attributes.get("weight", "regular"))
    adj_pool = [weight, fg, kind] + (["blurry"] if attributes.get("blur") else []) + \
        ([str(attributes.get("slant"))] if attributes.get("slant") == "italic" else [])
    ink_pool = [f"in {weight} {fg} ink", f"in {fg} ink", f"written in {fg}", f"{kind} in {fg}"]
    fontword = {"bold": "bold", "thin": "light", "regular": "regular"}.get(weight, "regular")
    template = str(rng.choice(_CAPTION_TEMPLATES))
    caption = template.format(
        d=d, D=d[0].upper() + d[1:], n=n, fg=fg, bg=bg, kind=kind, adj=str(rng.choice(adj_pool)),
        ink=str(rng.choice(ink_pool)), size=str(attributes.get("size", "medium")),
        pos=str(attributes.get("position", "centred")), fontword=fontword,
    )
    return caption
