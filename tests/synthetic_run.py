"""``robustbench-ft`` with the tests' synthetic suite registered, for tests that need a real process
(killed mid-training, or started by torchrun): ``python tests/synthetic_run.py run --suite synthetic ...``.

``RBFT_TEST_KILL_AT_STEP=K`` makes the process SIGKILL itself when fine-tuning reaches step K, as
an out-of-memory killer or a pre-empted node would: no cleanup, no exception handlers.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import conftest  # noqa: E402,F401  (registers the synthetic suite)

from robustbench_ft.cli import main  # noqa: E402
from robustbench_ft.methods import training  # noqa: E402

if "RBFT_TEST_KILL_AT_STEP" in os.environ:
    kill_at = int(os.environ["RBFT_TEST_KILL_AT_STEP"])
    schedule = training.cosine_lr

    def cosine_lr_then_die(step: int, cfg: training.OptimConfig) -> float:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return schedule(step, cfg)

    training.cosine_lr = cosine_lr_then_die

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
