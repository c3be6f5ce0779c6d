"""Bad input at the five entry points (train, probe, evaluate, align, prepare): each case gets
one line naming the thing at fault, exit status 2, no traceback, and leaves every file as it was.

The cases run through tests/entry_points.py (the real scripts, forked from one process that
imported the libraries, so that dozens of runs stay cheap).
"""

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import psutil
import pytest
import torch

from conftest import ROOT
from entry_points import EntryPoints
from modeconn.hf import save_hf
from modeconn.model import GPT, ModelConfig

TINY = str(ROOT / "configs" / "train" / "tiny-adamw.yaml")


@pytest.fixture(scope="module")
def entry():
    with EntryPoints() as e:
        yield e


def train_args(data, out, *extra):
    return ["--config", TINY, f"--data.dir={data}", f"--out_dir={out}", "--train.steps=2", "--train.micro_batch=2",
            "--data.val_windows=4", "--data.eval_batch_size=2", "--train.log_every=1", *extra]


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def write_lock(directory: Path, **holder) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "modeconn.lock").write_text(json.dumps({"tool": "train.py", "started_at": "2026-12-01 08:00:00",
                                                         **holder}))


@pytest.fixture(scope="module")
def world(tmp_path_factory, shakespeare, entry):
    """Inputs, good and bad, under one root (every case checks that nothing under it changed)."""
    root = tmp_path_factory.mktemp("bad-input")
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    save_hf(GPT(cfg), cfg, root / "good")
    torch.manual_seed(1)
    save_hf(GPT(cfg), cfg, root / "other-init")
    deeper = ModelConfig.from_preset("tiny", n_layer=3)
    save_hf(GPT(deeper), deeper, root / "deeper")

    shutil.copytree(root / "good", root / "flipped")
    flip_a_byte(root / "flipped" / "model.safetensors")
    shutil.copytree(root / "good", root / "truncated-hf")
    (root / "truncated-hf" / "modeconn_manifest.json").unlink()  # as Hugging Face writes them: no manifest
    truncate(root / "truncated-hf" / "model.safetensors", 5000)
    shutil.copytree(root / "good", root / "bad-config-json")
    (root / "bad-config-json" / "modeconn_manifest.json").unlink()
    (root / "bad-config-json" / "config.json").write_text("{not json")
    shutil.copytree(root / "good", root / "wrong-config")
    (root / "wrong-config" / "modeconn_manifest.json").unlink()
    (root / "wrong-config" / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_layer": "two", "n_head": 2, "n_embd": 64, "n_positions": 64, "vocab_size": 50257}))

    data = root / "data"
    shutil.copytree(shakespeare, data)
    shutil.copytree(data, root / "data-bad-meta")
    (root / "data-bad-meta" / "meta.json").write_text('{"splits": ')
    shutil.copytree(data, root / "data-cut-shard")
    shard = next((root / "data-cut-shard").glob("val_*.bin"))
    truncate(shard, shard.stat().st_size - 10)

    run = root / "run"  # a real run with two checkpoints
    result = entry.run("train.py", *train_args(data, run, "--checkpoint.every=1", "--checkpoint.export_init=true"))
    assert result.rc == 0, result.stderr[-3000:]
    shutil.copytree(run, root / "run-all-damaged")
    for ckpt in (root / "run-all-damaged" / "checkpoints").glob("step_*"):
        truncate(ckpt / "mp_rank_00_model_states.pt", 100)
    (root / "run-other-init" / "exports").mkdir(parents=True)
    shutil.copytree(root / "other-init", root / "run-other-init" / "exports" / "step_00000000")

    me = psutil.Process(os.getpid())
    write_lock(root / "locked-live", host=socket.gethostname(), pid=me.pid, process_start=me.create_time())
    write_lock(root / "locked-remote", host="node-elsewhere-17", pid=4242, slurm_job_id="991")
    (root / "probe-damaged-config").mkdir()
    (root / "probe-damaged-config" / "probe_config.yaml").write_text("runs: [unclosed\n")
    (root / "empty.jsonl").write_text("")
    (root / "docs").mkdir()
    (root / "docs" / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (root / "docs" / "fieldless.jsonl").write_text('{"body": "no text field here"}\n')
    (root / "not-a-bpe").write_text("this is not a BPE file\n")
    return root


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def runs(w, **pairs):
    return "--runs=" + json.dumps({k: str(w / v) for k, v in pairs.items()})


def probe_args(w, *extra, out="probe-out"):
    return [f"--data.dir={w / 'data'}", "--data.val_windows=4", f"--out_dir={w / out}", "--plots=false", *extra]


# (id, script, argv from the world root, what the one line must name)
CASES = [
    # train.py
    ("train-missing-config", "train.py", lambda w: ["--config", str(w / "nope.yaml")], "nope.yaml"),
    ("train-unknown-key", "train.py", lambda w: train_args(w / "data", w / "t", "--train.stepz=3"), "train.stepz"),
    ("train-wrong-type", "train.py", lambda w: train_args(w / "data", w / "t", "--train.steps=many"), "train.steps"),
    ("train-bad-choice", "train.py", lambda w: train_args(w / "data", w / "t", "--deepspeed.zero_stage=5"),
     "deepspeed.zero_stage"),
    ("train-negative-lr", "train.py", lambda w: train_args(w / "data", w / "t", "--optim.lr=-1"), "optim.lr"),
    ("train-owned-ds-key", "train.py", lambda w: train_args(w / "data", w / "t",
                                                            "--deepspeed.overrides={train_batch_size: 8}"),
     "deepspeed.overrides.train_batch_size"),
    ("train-missing-data", "train.py", lambda w: train_args(w / "no-data", w / "t"), "no-data"),
    ("train-damaged-meta", "train.py", lambda w: train_args(w / "data-bad-meta", w / "t"), "data-bad-meta/meta.json"),
    ("train-cut-shard", "train.py", lambda w: train_args(w / "data-cut-shard", w / "t"), "val_000000.bin"),
    ("train-init-from-missing", "train.py", lambda w: train_args(w / "data", w / "t", f"--init.from={w / 'gone'}"),
     "gone: no such file or directory"),
    ("train-init-from-damaged", "train.py", lambda w: train_args(w / "data", w / "t", f"--init.from={w / 'flipped'}"),
     "flipped/model.safetensors: checksum differs"),
    ("train-resume-nowhere", "train.py", lambda w: train_args(w / "data", w / "t", f"--resume={w / 'nowhere'}"),
     "--resume="),
    ("train-resume-weights-only", "train.py", lambda w: train_args(w / "data", w / "t", f"--resume={w / 'good'}"),
     "weights-only export"),
    ("train-all-checkpoints-damaged", "train.py", lambda w: train_args(w / "data", w / "run-all-damaged",
                                                                       "--resume=auto", "--train.steps=4"),
     "no intact checkpoint in"),
    ("train-existing-run", "train.py", lambda w: train_args(w / "data", w / "run"), "already holds a run"),
    ("train-other-init-export", "train.py", lambda w: train_args(w / "data", w / "run-other-init",
                                                                 "--checkpoint.export_init=true"),
     "run-other-init/exports/step_00000000 already exists with other weights"),
    ("train-locked-live", "train.py", lambda w: train_args(w / "data", w / "locked-live"), "which is still running"),
    ("train-locked-remote", "train.py", lambda w: train_args(w / "data", w / "locked-remote"),
     "rm " + "{root}/locked-remote/modeconn.lock"),
    ("train-out-dir-under-a-file", "train.py", lambda w: train_args(w / "data", w / "not-a-bpe" / "run"),
     "not-a-bpe/run"),
    # probe.py
    ("probe-missing-checkpoint", "probe.py", lambda w: probe_args(w, runs(w, a="good", b="not-there/final")),
     "not-there/final: no such file or directory"),
    ("probe-damaged-export", "probe.py", lambda w: probe_args(w, runs(w, a="good", b="flipped")),
     "flipped/model.safetensors: checksum differs"),
    ("probe-truncated-hf", "probe.py", lambda w: probe_args(w, runs(w, a="good", b="truncated-hf")),
     "truncated-hf/model.safetensors"),
    ("probe-bad-config-json", "probe.py", lambda w: probe_args(w, runs(w, a="good", b="bad-config-json")),
     "bad-config-json/config.json: not valid JSON"),
    ("probe-wrong-config", "probe.py", lambda w: probe_args(w, runs(w, a="good", b="wrong-config")),
     "wrong-config/config.json"),
    ("probe-different-models", "probe.py", lambda w: probe_args(w, runs(w, a="good", b="deeper")),
     "are different models (n_layer: 2 vs 3)"),
    ("probe-t-out-of-range", "probe.py", lambda w: probe_args(w, runs(w, a="good", b="other-init"),
                                                              "--t_values=[0.0, 1.5]"), "t_values"),
    ("probe-nothing", "probe.py", lambda w: probe_args(w), "nothing to probe"),
    ("probe-bad-shard", "probe.py", lambda w: probe_args(w, runs(w, a="good", b="other-init"), "--shard=rows"),
     "shard"),
    ("probe-missing-data", "probe.py", lambda w: probe_args(w, runs(w, a="good", b="other-init"),
                                                            f"--data.dir={w / 'no-data'}"), "no-data"),
    ("probe-locked", "probe.py", lambda w: probe_args(w, runs(w, a="good", b="other-init"), out="locked-live"),
     "locked-live/modeconn.lock is held by"),
    ("probe-damaged-batch-config", "probe.py", lambda w: probe_args(w, runs(w, a="good", b="other-init"),
                                                                    out="probe-damaged-config"),
     "probe-damaged-config/probe_config.yaml: not valid YAML"),
    # evaluate.py
    ("evaluate-missing", "evaluate.py", lambda w: [f"--init_from={w / 'gone'}", f"--out_dir={w / 'e'}"],
     "gone: no such file or directory"),
    ("evaluate-damaged", "evaluate.py", lambda w: [f"--init_from={w / 'flipped'}", f"--out_dir={w / 'e'}",
                                                   f"--data.dir={w / 'data'}"], "flipped/model.safetensors"),
    ("evaluate-truncated", "evaluate.py", lambda w: [f"--init_from={w / 'truncated-hf'}", f"--out_dir={w / 'e'}"],
     "truncated-hf/model.safetensors"),
    ("evaluate-missing-data", "evaluate.py", lambda w: [f"--init_from={w / 'good'}", f"--out_dir={w / 'e'}",
                                                        f"--data.dir={w / 'no-data'}"], "no-data"),
    ("evaluate-bad-bpe", "evaluate.py", lambda w: [f"--init_from={w / 'good'}", f"--out_dir={w / 'e'}",
                                                   f"--data.dir={w / 'data'}", "--data.val_windows=2",
                                                   f"--tokenizer.bpe_file={w / 'not-a-bpe'}"], "not-a-bpe"),
    ("evaluate-existing-out", "evaluate.py", lambda w: [f"--init_from={w / 'good'}", f"--out_dir={w / 'run'}"],
     "run already exists"),
    # align.py
    ("align-no-out", "align.py", lambda w: [f"--reference={w / 'good'}", f"--checkpoint={w / 'other-init'}"], "--out"),
    ("align-missing", "align.py", lambda w: [f"--reference={w / 'gone'}", f"--checkpoint={w / 'other-init'}",
                                             f"--out={w / 'a'}"], "gone: no such file or directory"),
    ("align-damaged", "align.py", lambda w: [f"--reference={w / 'good'}", f"--checkpoint={w / 'flipped'}",
                                             f"--out={w / 'a'}"], "flipped/model.safetensors: checksum differs"),
    ("align-different-models", "align.py", lambda w: [f"--reference={w / 'good'}", f"--checkpoint={w / 'deeper'}",
                                                      f"--out={w / 'a'}"], "are different models"),
    ("align-existing-out", "align.py", lambda w: [f"--reference={w / 'good'}", f"--checkpoint={w / 'other-init'}",
                                                  f"--out={w / 'flipped'}"], "flipped already exists"),
    ("align-activations-without-data", "align.py", lambda w: [f"--reference={w / 'good'}",
                                                              f"--checkpoint={w / 'other-init'}", f"--out={w / 'a'}",
                                                              "--align.method=activations"], "data"),
    # prepare.py
    ("prepare-no-files", "prepare.py", lambda w: ["--source.kind=files", f"--source.paths=[{w / 'none' / '*.txt'}]",
                                                  f"--out_dir={w / 'p'}"], "none/*.txt"),
    ("prepare-bad-fraction", "prepare.py", lambda w: ["--val_fraction=2", f"--out_dir={w / 'p'}"], "val_fraction"),
    ("prepare-broken-jsonl", "prepare.py", lambda w: ["--source.kind=files", f"--source.paths=[{w / 'docs' / 'bad.jsonl'}]",
                                                      f"--out_dir={w / 'p'}"], "bad.jsonl"),
    ("prepare-missing-field", "prepare.py", lambda w: ["--source.kind=files",
                                                       f"--source.paths=[{w / 'docs' / 'fieldless.jsonl'}]",
                                                       f"--out_dir={w / 'p'}"], "text"),
    ("prepare-bad-bpe", "prepare.py", lambda w: [f"--tokenizer.bpe_file={w / 'not-a-bpe'}", f"--out_dir={w / 'p'}"],
     "not-a-bpe"),
    ("prepare-other-settings", "prepare.py", lambda w: ["--val_fraction=0.2", f"--out_dir={w / 'data'}"],
     "data already holds tokens prepared with other settings"),
    ("prepare-out-dir-under-a-file", "prepare.py", lambda w: [f"--out_dir={w / 'empty.jsonl' / 'tokens'}"],
     "empty.jsonl"),
    ("prepare-unknown-kind", "prepare.py", lambda w: ["--source.kind=web", f"--out_dir={w / 'p'}"], "source.kind"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_changes_nothing(entry, world, case):
    name, script, argv, named = case
    before = snapshot(world)
    result = entry.run(script, *argv(world), env={"HF_HUB_OFFLINE": 1, "HF_DATASETS_OFFLINE": 1})
    detail = f"{name}: rc {result.rc}\nstderr:\n{result.stderr[-3000:]}\nstdout:\n{result.stdout[-1500:]}"
    assert result.rc == 2, detail
    assert "Traceback" not in result.stderr + result.stdout, detail
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, detail
    assert named.format(root=world) in errors[0], detail
    assert snapshot(world) == before, f"{name} changed files under {world}"


def test_enough_cases_at_every_entry_point():
    scripts = [c[1] for c in CASES]
    assert len(CASES) >= 30 and all(scripts.count(s) >= 5 for s in set(scripts)) and len(set(scripts)) == 5
