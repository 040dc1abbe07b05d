"""Fine-tuning methods: one module each, registered by name."""
from robustbench_ft.methods.base import Candidate, MethodContext, parse_alphas
from robustbench_ft.methods.registry import MethodSpec, get_method, list_methods, register_method

__all__ = ["Candidate", "MethodContext", "parse_alphas", "MethodSpec", "get_method", "list_methods",
           "register_method"]
