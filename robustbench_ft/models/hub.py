"""``hf-hub:`` checkpoints: CLIP weights and fine-tuned checkpoints on the Hugging Face hub, fetched through
open_clip's own loader and huggingface_hub's cache (offline use, pinned revisions).

A reference is ``hf-hub:ORG/REPO[@REVISION][/FILE]``:

* ``hf-hub:ORG/REPO`` is what open_clip's ``create_model('hf-hub:ORG/REPO')`` reads: the repo's
  ``open_clip_config.json`` (``model_cfg`` and ``preprocess_cfg``) and its weights,
  ``open_clip_model.safetensors`` where present, else ``open_clip_pytorch_model.bin``
  (``open_clip/pretrained.py::download_pretrained_from_hf``, open_clip 3.3.0; the same in v2.24.0);
* ``@REVISION`` (a branch, tag or 40-hex commit) pins the files. open_clip's ``hf-hub:`` names have
  no revision (its ``create_model`` never passes one); the harness passes it to the same
  ``download_pretrained_from_hf(..., revision=)``. Without one, ``main`` is read;
* ``/FILE`` names another file in the repo (a fine-tuned checkpoint for ``--finetuned``: a classifier
  saved by this harness, whose ``.json`` sidecar is fetched beside it, or any checkpoint
  ``import-checkpoint`` reads).

Files come from huggingface_hub's cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``; ``HF_HUB_OFFLINE=1``
reads it without any network access: ``models--ORG--REPO/refs/<branch>`` holds the commit whose
``snapshots/<commit>/`` holds the files). A reference is identified by the sha256 of its weights file
(run identities, records, submissions), and the commit the cache resolved is recorded.

``--pretrained hf-hub:ORG/REPO`` goes with ``--model ARCH``, the open_clip architecture the repo's
config describes: the harness names every model by its architecture (records, checkpoints), so a
repo whose ``model_cfg`` differs from ARCH's is refused, naming the keys that differ.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

PREFIX = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"
_REF = re.compile(r"hf-hub:(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
                  r"(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9._/-]*?))?(?:/(?P<file>[^@]+))?")
# open_clip preprocess_cfg key -> create_model_and_transforms argument
_PREPROCESS_ARGS = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
                    "resize_mode": "image_resize_mode"}


class HubError(ValueError):
    """An ``hf-hub:`` reference that is malformed, or whose files cannot be had."""


def is_hub(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str | None = None
    filename: str | None = None

    @classmethod
    def parse(cls, text: str) -> "HubRef":
        match = _REF.fullmatch(text.strip())
        if match is None or (match.group("file") or "").startswith("/") or ".." in (match.group("file") or ""):
            raise HubError(f"{text!r} is not an hf-hub reference; write hf-hub:ORG/REPO, hf-hub:ORG/REPO@REVISION or "
                           "hf-hub:ORG/REPO[@REVISION]/FILE")
        return cls(match.group("repo"), match.group("rev"), match.group("file"))

    def __str__(self) -> str:
        return PREFIX + self.repo + (f"@{self.revision}" if self.revision else "") + (
            f"/{self.filename}" if self.filename else "")


@dataclass(frozen=True)
class HubFile:
    """A file of a reference, in the local hub cache: its path, sha256 and the commit it came from."""

    ref: HubRef
    path: Path
    sha256: str
    commit: str | None

    def provenance(self) -> dict[str, Any]:
        return {"hf_hub": self.ref.repo, "revision": self.commit or self.ref.revision, "file": self.path.name,
                "sha256": self.sha256}


def fetch(ref: HubRef | str, filename: str | None = None) -> HubFile:
    """A file of the reference (``filename``, else the reference's own file, else open_clip's weights file),
    through open_clip's ``download_pretrained_from_hf`` and huggingface_hub's cache."""
    ref = HubRef.parse(ref) if isinstance(ref, str) else ref
    name = filename or ref.filename
    return _fetch(ref, name)


@lru_cache(maxsize=32)
def _fetch(ref: HubRef, filename: str | None) -> HubFile:
    from open_clip.pretrained import download_pretrained_from_hf

    from robustbench_ft.util import file_sha256

    try:
        path = Path(download_pretrained_from_hf(ref.repo, filename=filename, revision=ref.revision))
    except (FileNotFoundError, RuntimeError, ValueError, OSError) as exc:
        raise HubError(f"{ref}: cannot get {filename or 'its open_clip weights'} ({str(exc).splitlines()[0][:300]}); "
                       "with HF_HUB_OFFLINE=1 the file must be in the hub cache (HF_HUB_CACHE, or HF_HOME/hub)"
                       ) from None
    commit = next((d.name for d in path.parents if d.parent.name == "snapshots"), None)  # snapshots/<commit>/...
    return HubFile(ref, path, file_sha256(path), commit)


def model_config(ref: HubRef) -> dict[str, Any]:
    """The repo's ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``)."""
    path = fetch(ref, CONFIG_FILE).path
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HubError(f"{ref}: {CONFIG_FILE} is not readable JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise HubError(f"{ref}: {CONFIG_FILE} has no model_cfg table; is it an open_clip model repo?")
    return config


def check_architecture(ref: HubRef, model: str, config: dict[str, Any]) -> None:
    """Refuse a repo whose ``model_cfg`` is not the architecture ``model`` (records name the architecture)."""
    import open_clip

    expected = open_clip.get_model_config(model)
    found = config["model_cfg"]
    if expected is None or _canonical(found) != _canonical(expected):
        keys = sorted(k for k in set(found) | set(expected or {}) if _canonical(found.get(k))
                      != _canonical((expected or {}).get(k)))
        raise HubError(f"{ref} is not a {model}: its {CONFIG_FILE} model_cfg differs in {', '.join(keys[:6])}; pass "
                       "the --model whose open_clip config it is (its model_cfg is that config)")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def preprocess_arguments(config: dict[str, Any]) -> dict[str, Any]:
    """The repo's ``preprocess_cfg`` as open_clip's ``create_model_and_transforms`` arguments."""
    cfg = config.get("preprocess_cfg") or {}
    return {arg: (tuple(cfg[key]) if isinstance(cfg[key], list) else cfg[key])
            for key, arg in _PREPROCESS_ARGS.items() if cfg.get(key) is not None}
