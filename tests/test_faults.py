"""Fault injection: a 2-rank run SIGKILLed ten times at seeded random moments, each time
continued with --resume=auto, ends bit-identical to a run that was never killed.

The moments: while the init export is being written and before the first checkpoint, while a
checkpoint is at each of its stages (files, manifest, COMPLETE) and an export is being written,
mid-line in metrics.jsonl, mid-step, and at random times (which can fall anywhere, startup
included). A moment is reached by tests/faulty_train.py, which waits there until the whole job
is killed; a random-time kill comes after a random delay unless that wait comes first. Each
moment is drawn among those the resumed run will still pass through (after the checkpoint it
resumes from). Replay a failure with MODECONN_FAULT_SEED=<seed printed in the failure>.
"""

import json
import os
import random
import signal
import time

import pytest

from modeconn.checkpoint import COMPLETE
from test_train import kill_tree
from train_runner import assert_same_weights, losses, metrics, start, train

STEPS, EVERY, EXPORT_EVERY, ACCUM = 12, 3, 4, 2
RUN = {"train.steps": STEPS, "checkpoint.every": EVERY, "checkpoint.export_every": EXPORT_EVERY,
       "checkpoint.export_init": True, "checkpoint.keep_last": 2, "train.grad_accum": ACCUM, "train.micro_batch": 4,
       "model.dropout": 0.1, "train.eval_every": 6, "schedule.kind": "cosine", "schedule.warmup_steps": 2}
SETUPS = {
    "adamw-zero1": ("tiny-adamw.yaml", {"deepspeed.zero_stage": 1}, 1),
    "muon-zero2": ("tiny-muon.yaml", {"deepspeed.zero_stage": 2}, 2),
}
# After the first two kills (init export being written; after it, before the first checkpoint):
LATER_KINDS = ["checkpoint-files", "checkpoint-manifest", "checkpoint-latest", "export-files", "metrics-line",
               "mid-step", "random-time", "random-time"]
RANK0_ONLY = {"export-files", "checkpoint-manifest", "checkpoint-latest", "metrics-line"}


def resume_step(out) -> int:
    """The step the next --resume=auto continues from: the newest complete checkpoint."""
    tags = [p.name for p in (out / "checkpoints").glob("step_*") if (p / COMPLETE).is_file()]
    return max((int(t.split("_")[1]) for t in tags), default=0)


def draw_moment(rng: random.Random, kind: str, resumes_at: int, final_written: bool) -> tuple[str, int, int]:
    """(moment, step, rank) that a run resuming at `resumes_at` passes through."""
    later = range(resumes_at + 1, STEPS + 1)
    if kind == "random-time":  # the backstop: a moment that lies ahead for sure
        kind = "mid-step" if resumes_at < STEPS else "export-files"
    if kind.startswith("checkpoint-"):
        steps = [s for s in later if s % EVERY == 0 or s == STEPS]
    elif kind == "export-files":
        steps = [s for s in later if s % EXPORT_EVERY == 0 and s != STEPS] + ([] if final_written else [STEPS])
        if resumes_at == 0:
            steps.append(0)
    else:
        steps = list(later)
    if not steps:  # nothing of that kind lies ahead: mid-step or the final export do
        return draw_moment(rng, "random-time", resumes_at, final_written)
    step = rng.choice(steps)
    if kind == "mid-step":  # the second micro-batch of the step: half its gradient is accumulated
        step = (step - 1) * ACCUM + 1
    return kind, step, 0 if kind in RANK0_ONLY else rng.randrange(2)


def kill_once(shakespeare, out, config, setup, moment, delay, tmp_path) -> str:
    kind, step, rank = moment
    marker = tmp_path / "at-the-moment"
    marker.unlink(missing_ok=True)
    proc = start(shakespeare, out, nproc=2, config=config, script="tests/faulty_train.py",
                 extra_env={"MODECONN_TEST_FAULT": f"{kind}:{step}:{rank}:{marker}"}, resume="auto", **setup)
    began, deadline = time.time(), time.time() + 240
    while not marker.exists() and (delay is None or time.time() - began < delay):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {moment} (rc={proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {moment}")
        time.sleep(0.01)
    kill_tree(proc, signal.SIGKILL)
    proc.wait()
    return f"{kind}@{step}/rank{rank}" if marker.exists() else f"random {time.time() - began:.2f}s"


@pytest.fixture(scope="module")
def references(shakespeare, tmp_path_factory):
    root = tmp_path_factory.mktemp("never-killed")
    out = {}
    for name, (config, stage, _) in SETUPS.items():
        out[name] = root / name
        train(shakespeare, out[name], nproc=2, config=config, **RUN, **stage)
    return out


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_ten_kills_at_random_moments_end_as_if_never_killed(shakespeare, tmp_path, references, name):
    config, stage, default_seed = SETUPS[name]
    seed = int(os.environ.get("MODECONN_FAULT_SEED", default_seed))
    rng = random.Random(seed)
    setup = dict(RUN, **stage)
    out = tmp_path / "run"
    kinds = ["export-files", "mid-step"] + rng.sample(LATER_KINDS, len(LATER_KINDS))
    done = []
    for i, kind in enumerate(kinds):
        at = resume_step(out) if out.exists() else 0
        if i == 0:
            moment = ("export-files", 0, 0)  # the init export is being written; no checkpoint yet
        elif i == 1:  # the init export is published, the first checkpoint not written yet
            moment = ("mid-step", rng.randrange(1, EVERY * ACCUM), rng.randrange(2))
        else:
            moment = draw_moment(rng, kind, at, (out / "final").exists())
        delay = rng.uniform(0.5, 12.0) if kind == "random-time" else None
        done.append(kill_once(shakespeare, out, config, setup, moment, delay, tmp_path))
    context = f"seed {seed}, kills: {done}"
    print(context)  # shown with -s, or -rP
    assert len(done) == 10, context

    final = train(shakespeare, out, nproc=2, config=config, resume="auto", **setup)
    reference = references[name]
    assert losses(out) == losses(reference), context  # every step once, with the same loss
    assert [r["step"] for r in metrics(out, "val")] == [r["step"] for r in metrics(reference, "val")], context
    assert_same_weights(out / "final", reference / "final")
    for step in (0, 4, 8):  # the init and periodic exports too, reused or rewritten
        assert_same_weights(out / "exports" / f"step_{step:08d}", reference / "exports" / f"step_{step:08d}")
    # nothing half-written is left, no lock is held, and no checkpoint was lost to a fallback
    leftovers = [p for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name or ".retired-" in p.name]
    assert leftovers == [] and not (out / "modeconn.lock").exists(), (context, leftovers)
    assert not list((out / "checkpoints").glob("*.damaged*")), context
    assert "Traceback" not in final.stderr, context


def test_one_writer_per_out_dir_and_ranks_end_with_their_launcher(shakespeare, tmp_path):
    """A second launch on a running run's out_dir is refused at once, naming the holder. When the
    first run's launcher is SIGKILLed alone, its ranks exit by themselves (they do not keep
    writing as orphans), and the next launch takes the dead holder's lock over and resumes."""
    import psutil

    out = tmp_path / "run"
    run = dict(RUN, **{"train.steps": 400, "checkpoint.export_every": 0, "deepspeed.zero_stage": 1})
    first = start(shakespeare, out, nproc=2, **run)
    deadline = time.time() + 120
    while not any(r["step"] >= 3 for r in metrics(out)) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    ranks = [c for c in psutil.Process(first.pid).children(recursive=True) if "train.py" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    holder = json.loads((out / "modeconn.lock").read_text())
    assert holder["pid"] in {r.pid for r in ranks}

    # (one process: torchrun would report its worker's status 2 as its own failure, status 1)
    second = train(shakespeare, out, nproc=1, launcher="python", check=False, resume="auto", **run)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"modeconn.lock is held by train.py on host {holder['host']}, pid {holder['pid']}" in second.stderr
    assert first.poll() is None  # the first run went on

    os.kill(first.pid, signal.SIGKILL)  # the launcher alone; torchrun's ranks live in sessions of their own
    first.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, "ranks outlived their launcher"
    assert first.stdout.read().count("torchrun (pid") == 2  # each rank said why it left
    steps_then = len(metrics(out))
    time.sleep(1.0)
    assert len(metrics(out)) == steps_then  # nobody writes into out_dir any more

    third = train(shakespeare, out, nproc=2, resume="auto", **dict(run, **{"train.stop_at_step": 1}))
    assert "took over" in third.stderr and "is no longer running" in third.stderr
    assert "resumed from" in third.stdout and not (out / "modeconn.lock").exists()
