"""robustbench-ft: benchmark robust fine-tuning of zero-shot image-text models (CLIP via open_clip).

``from robustbench_ft import run, RunConfig`` does what ``robustbench-ft run`` does.
"""
from robustbench_ft.config import RunConfig
from robustbench_ft.datasets.registry import register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.methods import Candidate, MethodContext, register_method
from robustbench_ft.models import Classifier, load_clip
from robustbench_ft.results import ResultRecord, load_records
from robustbench_ft.runner import run

__version__ = "0.1.0"
__all__ = ["RunConfig", "DatasetSpec", "Suite", "register_dataset", "register_suite", "Candidate", "MethodContext",
           "register_method", "Classifier", "load_clip", "ResultRecord", "load_records", "run"]
