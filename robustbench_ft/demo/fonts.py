"""Fonts for rendering digits, split once into a pretraining set and a held-out set.

The demo model is pretrained on digits rendered in ``PRETRAIN_FONTS``; the demo suite's
``demo-fonts`` shift renders digits in ``HELDOUT_FONTS`` (a different type family), so that
shift measures generalisation to unseen print styles rather than memorised glyphs.
Only fonts that ship inside matplotlib are used: every machine that installs the harness
has them, so the shards and the pretraining corpus are rebuilt identically anywhere.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

_TTF_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"

# DejaVu and STIX families: sans, mono, serif, in regular/bold/italic variants.
PRETRAIN_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)
# Computer Modern (TeX) family: never seen in pretraining.
HELDOUT_FONTS: tuple[str, ...] = ("cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf")


def font_paths(names: tuple[str, ...]) -> list[Path]:
    """Absolute paths of the named matplotlib fonts; raises if matplotlib lacks one."""
    paths = [_TTF_DIR / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"matplotlib's bundled fonts {missing} are missing from {_TTF_DIR}; "
            "reinstall matplotlib (pip install --force-reinstall matplotlib)"
        )
    return paths
