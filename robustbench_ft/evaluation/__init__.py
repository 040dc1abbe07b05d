"""Evaluation: one pass over a dataset for many candidates, with feature and logits caches."""
from robustbench_ft.evaluation.cache import ArrayCache
from robustbench_ft.evaluation.dataset_pass import Predictions, evaluate, evaluate_cached
from robustbench_ft.evaluation.pipeline import eval_pipeline

__all__ = ["ArrayCache", "Predictions", "evaluate", "evaluate_cached", "eval_pipeline"]
