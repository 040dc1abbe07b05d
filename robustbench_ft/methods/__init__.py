"""Fine-tuning methods: one module each, registered by name.

Importing this package registers the built-in methods; third-party packages register theirs through the
entry-point group ``robustbench_ft.methods``.
"""
from robustbench_ft.methods import (  # noqa: F401, E402  (register the built-in methods)
    adversarial,
    carot,
    digrap,
    ensemble,
    finetune,
    flyp,
    fsr,
    ftp,
    l2_sp,
    linear_probe,
    lp_ft,
    m2_mix,
    model_stock,
    soup,
    spd,
    tpgm,
    vrf,
    wise_ft,
    zeroshot,
)
from robustbench_ft.methods.context import Candidate, MethodContext, parse_alphas
from robustbench_ft.methods.registry import MethodSpec, get_method, list_methods, register_method

__all__ = ["Candidate", "MethodContext", "parse_alphas", "MethodSpec", "get_method", "list_methods",
           "register_method"]
