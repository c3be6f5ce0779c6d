"""train.py, except that the checkpoint of step N stops after DeepSpeed wrote its files and before
the checkpoint is marked complete; it touches a marker file and waits there to be killed.

    MODECONN_TEST_HOLD_CHECKPOINT=N:/path/to/marker python tests/hold_checkpoint_train.py ...
(Test-only: it wraps our own Checkpointer, not a library.)
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeconn import checkpoint  # noqa: E402
from modeconn.cli import run_cli  # noqa: E402
from modeconn.train import main  # noqa: E402

hold_step, marker = os.environ["MODECONN_TEST_HOLD_CHECKPOINT"].split(":", 1)
saving_step = {"step": None}
original_save, original_barrier = checkpoint.Checkpointer.save, checkpoint.barrier


def save(self, step, *args, **kwargs):
    saving_step["step"] = step
    return original_save(self, step, *args, **kwargs)


def barrier():
    if saving_step["step"] == int(hold_step):  # DeepSpeed's files and the rank files are written
        Path(marker).touch()
        time.sleep(3600)
    original_barrier()


checkpoint.Checkpointer.save = save
checkpoint.barrier = barrier

if __name__ == "__main__":
    run_cli(main)
