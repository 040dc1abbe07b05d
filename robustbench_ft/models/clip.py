"""Loading CLIP models through open_clip: by open_clip pretrained tag, bundled tag, or local file.

Local checkpoints are loaded safely: ``.safetensors`` directly, anything else with
``torch.load(weights_only=True)``. An arbitrary pickle is never unpickled.
"""
from __future__ import annotations

import difflib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import open_clip
import torch

if TYPE_CHECKING:
    from robustbench_ft.models.hub import HubRef

CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"

# Pretrained tags whose weights ship inside this package (no network needed).
BUNDLED_WEIGHTS: dict[tuple[str, str], Path] = {
    ("rbft-demo-vit", "rbft-demo"): WEIGHTS_DIR / "rbft-demo-vit.safetensors",
}
RANDOM_INIT = "random"  # pretrained value meaning "no weights" (tests, architecture checks)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
PRECISIONS = ("fp32", "amp_bf16")

_configs_registered = False


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested architecture."""


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_init():
    """open_clip warns when it builds a model without weights; we load the weights ourselves right after."""
    log_filter = _NoRandomInitWarning()
    logging.getLogger().addFilter(log_filter)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(log_filter)


def create_architecture(model: str, **preprocess: Any) -> tuple[torch.nn.Module, Callable, Callable]:
    """An open_clip model with random weights and its (train, eval) transforms; ``preprocess`` overrides
    open_clip's transform settings (``image_mean``, ``image_std``, ...: an hf-hub repo's own)."""
    register_model_configs()
    with _quiet_random_init():
        return open_clip.create_model_and_transforms(model, pretrained=None, **preprocess)


def register_model_configs() -> None:
    """Make the project's model configs (tiny test models, the demo model) known to open_clip."""
    global _configs_registered
    if not _configs_registered:
        open_clip.add_model_config(CONFIG_DIR)
        _configs_registered = True


def list_models() -> list[str]:
    register_model_configs()
    return sorted(open_clip.list_models())


def pretrained_tags(model: str) -> list[str]:
    bundled = [tag for (name, tag) in BUNDLED_WEIGHTS if name == model]
    return bundled + list(open_clip.list_pretrained_tags_by_model(model))


@dataclass
class LoadedCLIP:
    """An open_clip model with its transforms and tokenizer, and where its weights came from."""

    name: str
    pretrained: str
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_eval: Callable
    tokenizer: Callable
    device: torch.device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    return dev


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked for (on GPU in practice); a no-op context for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "amp_bf16")


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from the usual {"state_dict": ...} containers.

    ``.safetensors`` files cannot contain code. Other files are read with ``weights_only=True``;
    ``trust_pickle=True`` (an explicit user decision) allows a full unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        if trust_pickle:
            raise CheckpointError(f"{path}: could not be loaded ({exc})") from exc
        raise CheckpointError(
            f"{path}: not a weights-only checkpoint (torch.load(weights_only=True) refused it: "
            f"{str(exc).splitlines()[0]}). Refusing to unpickle arbitrary objects, which can run code. "
            "Convert it to safetensors, or pass --trust-pickle if you trust its author."
        ) from exc
    if isinstance(obj, torch.nn.Module):  # a pickled module (only reachable with trust_pickle)
        obj = obj.state_dict()
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    prefix = "module."  # DistributedDataParallel wrappers
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in obj.items()}


def check_state_dict(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming the first keys that are missing, unexpected, differ in shape or
    hold NaN/infinite values (a diverged or damaged checkpoint would otherwise train or score as NaN)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), first {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first {unexpected[:3]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), first {shapes[:3]}")
    if problems:
        raise CheckpointError(f"{source} does not match the model architecture: " + "; ".join(problems)
                              + ". Check --model matches the checkpoint.")
    check_finite(got, source)


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming the first tensor that holds NaN or infinite values (a diverged or
    damaged checkpoint would otherwise train or score as NaN)."""
    non_finite = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        raise CheckpointError(f"{source}: tensor {non_finite[0]!r} holds NaN or infinite values"
                              + (f" (and {len(non_finite) - 1} more tensor(s))" if len(non_finite) > 1 else "")
                              + "; the checkpoint is damaged or its training diverged")


def unknown_model_error(model: str) -> KeyError:
    valid = list_models()
    close = difflib.get_close_matches(model, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return KeyError(f"unknown model {model!r}.{hint} `robustbench-ft list models` shows all {len(valid)} names.")


def resolve_weights(model: str, pretrained: str | None) -> "Path | str | HubRef | None":
    """Validate a (model, pretrained) pair without loading anything.

    Returns the checkpoint path for a bundled tag or a local file, the tag for an open_clip
    pretrained tag, the parsed reference for ``hf-hub:ORG/REPO[@REVISION]`` (see
    :mod:`robustbench_ft.models.hub`), or None for random initialisation; raises a clear error for
    anything else.
    """
    from robustbench_ft.models.hub import HubRef, is_hub

    register_model_configs()
    if model not in open_clip.list_models():
        raise unknown_model_error(model)
    pretrained = pretrained or RANDOM_INIT
    if is_hub(pretrained):
        return HubRef.parse(pretrained)
    bundled = BUNDLED_WEIGHTS.get((model, pretrained))
    if bundled is not None:
        if not bundled.is_file():
            raise FileNotFoundError(f"bundled weights {bundled} are missing from the installed package; reinstall "
                                    "robustbench-ft or rebuild them with `robustbench-ft zoo pretrain-demo`")
        return bundled
    local = Path(pretrained)
    if local.suffix in CHECKPOINT_SUFFIXES or local.is_file():
        if not local.is_file():
            raise FileNotFoundError(f"checkpoint {local} does not exist")
        return local
    if pretrained == RANDOM_INIT:
        return None
    tags = pretrained_tags(model)
    if pretrained not in tags:
        close = difflib.get_close_matches(pretrained, tags, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"{pretrained!r} is neither a local checkpoint file nor a pretrained tag of {model}.{hint} "
                       f"Tags for {model}: {', '.join(tags) or 'none'} (or 'random').")
    return pretrained


def load_clip(model: str, pretrained: str | None = RANDOM_INIT, device: str | torch.device = "cpu",
              precision: str = "fp32", *, trust_pickle: bool = False) -> LoadedCLIP:
    """Build an open_clip model and load its weights.

    ``pretrained`` is an open_clip tag (``openai``, ``laion2b_s34b_b79k``: downloaded by open_clip
    on first use), a tag bundled with this package (``rbft-demo``), a local checkpoint file, an
    ``hf-hub:ORG/REPO[@REVISION]`` reference (open_clip's hub loader and huggingface_hub's cache;
    the repo's config must be ``model``'s, its preprocessing is used), or ``random`` for random
    initialisation.
    """
    from robustbench_ft.models import hub

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    dev = resolve_device(device)
    weights = resolve_weights(model, pretrained)
    if isinstance(weights, hub.HubRef):
        config = hub.model_config(weights)
        hub.check_architecture(weights, model, config)
        files = hub.fetch(weights)
        net, preprocess_train, preprocess_eval = create_architecture(model, **hub.preprocess_arguments(config))
        state = read_state_dict(files.path, trust_pickle=trust_pickle)
        check_state_dict(net.state_dict(), state, f"{weights} ({files.path.name})")
        net.load_state_dict(state)
    elif isinstance(weights, Path):
        net, preprocess_train, preprocess_eval = create_architecture(model)
        state = read_state_dict(weights, trust_pickle=trust_pickle)
        check_state_dict(net.state_dict(), state, str(weights))
        net.load_state_dict(state)
    elif weights is None:
        net, preprocess_train, preprocess_eval = create_architecture(model)
    else:
        net, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(model, pretrained=weights)
    net = net.to(dev).eval()
    return LoadedCLIP(model, pretrained or RANDOM_INIT, net, preprocess_train, preprocess_eval,
                      open_clip.get_tokenizer(model), dev)
