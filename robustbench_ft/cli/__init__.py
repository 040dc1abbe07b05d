"""The ``robustbench-ft`` command line (``main``); ``run_config_from_argv`` gives the RunConfig a ``run`` command line describes."""
from robustbench_ft.cli.main import main
from robustbench_ft.cli.run import run_config_from_argv

__all__ = ["main", "run_config_from_argv"]
