"""How many examples a fuzz test draws: its CI count, ten times that under the `explore` profile
(``HYPOTHESIS_PROFILE=explore``, random draws; see conftest.py)."""
from __future__ import annotations

import os


def examples(ci: int) -> int:
    return ci * 10 if os.environ.get("HYPOTHESIS_PROFILE") == "explore" else ci
