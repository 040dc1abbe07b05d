"""``python -m robustbench_ft.cli``: the same as the ``robustbench-ft`` command."""
import sys

from robustbench_ft.cli.main import main

sys.exit(main())
