"""train.py with one fault point: at a chosen moment one rank touches a marker file and waits
there, so that a test can SIGKILL the whole job at exactly that moment.

    MODECONN_TEST_FAULT=<moment>:<step>:<rank>:<marker> python tests/faulty_train.py ...

Moments (the test wraps our own functions, never a library's):
  export-files         the files of the export of <step> are in its temporary directory, unpublished
  checkpoint-files     DeepSpeed's and the per-rank files of checkpoint <step> are written; no manifest
  checkpoint-manifest  its manifest is written; no COMPLETE yet
  checkpoint-latest    COMPLETE is written; `latest` still names the checkpoint before
  metrics-line         half of step <step>'s train row is in metrics.jsonl
  mid-step             micro-batch <step> (counted from 0 over the run) is about to be drawn
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeconn import checkpoint, export, logger  # noqa: E402
from modeconn.cli import run_cli  # noqa: E402
from modeconn.data import loader  # noqa: E402
from modeconn.train import main  # noqa: E402

moment, step, rank, marker = os.environ["MODECONN_TEST_FAULT"].split(":", 3)
step, rank = int(step), int(rank)
my_rank = int(os.environ.get("RANK", "0"))


def hold(when: bool) -> None:
    if when and my_rank == rank:
        Path(marker).write_text(moment)
        time.sleep(3600)


original_write_hf = export.write_hf


def write_hf(state, cfg, directory, metadata=None):
    original_write_hf(state, cfg, directory, metadata)
    hold(moment == "export-files" and (metadata or {}).get("step") == step)


original_hash_spread = checkpoint._hash_spread


def hash_spread(directory, names, world):
    hold(moment == "checkpoint-files" and directory.name == checkpoint.tag_for(step))
    return original_hash_spread(directory, names, world)


original_atomic_write_text = checkpoint.atomic_write_text


def atomic_write_text(target, text):
    target = Path(target)
    hold(moment == "checkpoint-manifest" and target.name == checkpoint.COMPLETE
         and target.parent.name == checkpoint.tag_for(step))
    hold(moment == "checkpoint-latest" and target.name == checkpoint.LATEST and text == checkpoint.tag_for(step))
    original_atomic_write_text(target, text)


original_log = logger.MetricsLogger.log


def log(self, kind, at_step, values, console=None):
    if moment == "metrics-line" and kind == "train" and at_step == step and self.enabled and my_rank == rank:
        line = json.dumps({"kind": kind, "step": at_step, "time": round(time.time(), 3), **values})
        with open(self.path, "a") as f:
            f.write(line[: len(line) // 2])
        hold(True)
    original_log(self, kind, at_step, values, console)


original_next_batch = loader.TrainLoader.next_batch


def next_batch(self):
    hold(moment == "mid-step" and self.epoch == 0 and self.consumed // self.global_batch == step)
    return original_next_batch(self)


export.write_hf = write_hf
checkpoint._hash_spread = hash_spread
checkpoint.atomic_write_text = atomic_write_text
logger.MetricsLogger.log = log
loader.TrainLoader.next_batch = next_batch

if __name__ == "__main__":
    run_cli(main)
