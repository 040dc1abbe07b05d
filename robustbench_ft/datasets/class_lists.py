"""Class lists, label mappings and prompt templates shipped as data files (``class_lists/``, each naming its
source in ``class_lists/README.md``).
"""
from __future__ import annotations

from pathlib import Path

CLASS_LISTS = Path(__file__).parent / "class_lists"
"""Class lists, subsets, mappings and prompt templates: facts of the datasets, each file naming its source."""


def load_list(name: str) -> tuple[str, ...]:
    """The lines of ``class_lists/<name>`` after its ``#`` header (which names the source)."""
    text = (CLASS_LISTS / name).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip() and not line.startswith("#"))


def load_table(name: str) -> list[list[str]]:
    """The rows of the tab-separated ``class_lists/<name>``."""
    return [line.split("\t") for line in load_list(name)]
