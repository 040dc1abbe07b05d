"""open_clip loading, zero-shot heads and the Classifier (image encoder + linear head)."""
from robustbench_ft.models.classifier import Classifier, ClassifierInfo, interpolate
from robustbench_ft.models.clip import (
    CheckpointError,
    LoadedCLIP,
    list_models,
    load_clip,
    read_state_dict,
    register_model_configs,
    resolve_device,
)
from robustbench_ft.models.zeroshot import zeroshot_weights

__all__ = ["Classifier", "ClassifierInfo", "interpolate", "CheckpointError", "LoadedCLIP", "list_models",
           "load_clip", "read_state_dict", "register_model_configs", "resolve_device", "zeroshot_weights"]
