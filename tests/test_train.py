"""train.py end to end, with 1-3 CPU ranks (gloo): ZeRO stages, resume, kills, signals, exports."""

import json
import math
import os
import signal
import time

import pytest
import torch
from transformers import GPT2LMHeadModel

from modeconn.checkpoint import COMPLETE
from modeconn.data.loader import TokenWindows, ValidationSet
from modeconn.metrics import evaluate_lm
from train_runner import assert_same_weights, losses, metrics, start, train, weights


def wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended before the event (rc={proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for train.py")


def kill_tree(proc, sig):
    """Signal the launcher and every process under it at once (torchrun starts each rank in a
    session of its own, so a process-group kill would miss them): a crash of the whole job."""
    import psutil

    root = psutil.Process(proc.pid)
    for p in root.children(recursive=True) + [root]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def hf_val_loss(export_dir, data_dir):
    model = GPT2LMHeadModel.from_pretrained(export_dir).eval()
    val = ValidationSet(TokenWindows(data_dir, "val", model.config.n_positions), 16)
    return evaluate_lm(lambda x: model(x).logits, val.batches(4))["loss"]


# --- ZeRO stages ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage_runs(shakespeare, tmp_path_factory):
    """The same 6-step run at ZeRO 0-3 on 2 ranks (gradient accumulation 2, clipping on), with a
    DeepSpeed checkpoint at the end; and no compiled C++ op (TORCH_EXTENSIONS_DIR stays empty)."""
    root = tmp_path_factory.mktemp("stages")
    ext = root / "torch_extensions"
    ext.mkdir()
    runs = {}
    for stage in (0, 1, 2, 3):
        out = root / f"zero{stage}"
        launcher = "deepspeed" if stage == 2 else "torchrun"
        train(shakespeare, out, nproc=2, launcher=launcher, extra_env={"TORCH_EXTENSIONS_DIR": ext},
              **{"deepspeed.zero_stage": stage, "train.steps": 6, "train.grad_accum": 2, "checkpoint.every": 6,
                 "train.eval_every": 6})
        runs[stage] = out
    assert list(ext.iterdir()) == [], "a DeepSpeed op was compiled at run time"
    return runs


def test_all_zero_stages_train_alike(stage_runs):
    """With accumulation and clipping the stages add gradients and norms in different orders
    (ZeRO-2 reduces every micro-batch, ZeRO-0 clips with torch's norm): equal to fp32 rounding.
    Without both they are bit-identical (next test)."""
    ref = losses(stage_runs[0])
    assert sorted(ref) == list(range(1, 7))
    assert ref[6] < ref[1] - 0.3  # it learns
    for stage in (1, 2, 3):
        assert losses(stage_runs[stage]).keys() == ref.keys()
        for step, loss in losses(stage_runs[stage]).items():
            assert loss == pytest.approx(ref[step], rel=1e-6), (stage, step)
    for stage, out in stage_runs.items():
        (val,) = metrics(out, "val")
        assert val["step"] == 6 and math.isfinite(val["loss"])


def test_export_is_the_trained_model_in_hf(stage_runs, shakespeare):
    """The final export loads in GPT2LMHeadModel, gives our validation loss, and equals DeepSpeed's
    own consolidation of its checkpoint (the oracle), at every stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for stage, out in stage_runs.items():
        (val,) = metrics(out, "val")
        assert hf_val_loss(out / "final", shakespeare) == pytest.approx(val["loss"], abs=1e-5)
        ckpt = out / "checkpoints"
        if stage == 0:  # no ZeRO files: the module state is whole
            oracle = torch.load(ckpt / "step_00000006" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        else:
            oracle = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
        ours = weights(out / "final")
        for name, tensor in oracle.items():
            hf_name = name
            t = tensor.float()
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                t = t.t()
            assert torch.equal(ours[hf_name], t), (stage, name)
        meta = json.loads((out / "final" / "modeconn_meta.json").read_text())
        assert meta["step"] == 6 and meta["zero_stage"] == stage and meta["optimizer"] == "adamw"
        assert meta["val_loss"] == pytest.approx(val["loss"])


def test_zero_stages_are_bit_identical_without_accumulation_and_clipping(shakespeare, tmp_path):
    for stage in (0, 3):
        train(shakespeare, tmp_path / f"z{stage}", nproc=2, **{"deepspeed.zero_stage": stage, "train.steps": 4,
                                                              "train.grad_clip": 0, "checkpoint.every": 0})
    assert losses(tmp_path / "z0") == losses(tmp_path / "z3")
    assert_same_weights(tmp_path / "z0" / "final", tmp_path / "z3" / "final")


# --- resume ----------------------------------------------------------------------------------------

# Heavy enough micro-batches (~0.2 s a step) that a test can kill a run between two checkpoints.
RESUME = {"deepspeed.zero_stage": 1, "train.grad_accum": 2, "model.dropout": 0.1, "train.steps": 8,
          "train.micro_batch": 16, "checkpoint.every": 3, "schedule.kind": "cosine", "schedule.warmup_steps": 2}


@pytest.fixture(scope="module")
def reference(shakespeare, tmp_path_factory):
    """An uninterrupted 2-rank run: dropout on (RNG matters), accumulation 2, a real schedule."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(shakespeare, out, nproc=2, **RESUME)
    return out


def test_stop_and_resume_is_bit_exact_past_a_damaged_checkpoint(shakespeare, tmp_path, reference):
    """Stopped at step 5 (train.stop_at_step), then a DeepSpeed file of that newest checkpoint is
    truncated: the resume names the file, keeps the checkpoint aside untouched, continues from
    step 3, and ends with the losses and weights of a run never stopped."""
    out = tmp_path / "run"
    first = train(shakespeare, out, nproc=2, **RESUME, **{"train.stop_at_step": 5})
    assert "stopping at step 5" in first.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step_00000005" and not (out / "final").exists()
    damaged = out / "checkpoints" / "step_00000005" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size // 3)
    kept = {p.name: p.read_bytes() for p in damaged.parent.iterdir()}
    resumed = train(shakespeare, out, nproc=2, resume="auto", **RESUME)
    assert f"{damaged}: " in resumed.stderr and "bytes, the manifest says" in resumed.stderr
    assert "step_00000003 at step 3" in resumed.stdout
    aside = out / "checkpoints" / "step_00000005.damaged"
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == kept  # never deleted, never changed
    assert losses(out) == losses(reference)  # the same per-step losses, and no duplicated rows
    assert len(metrics(out)) == 8
    assert_same_weights(out / "final", reference / "final")


@pytest.mark.parametrize("nproc, sig", [(1, signal.SIGTERM), (2, signal.SIGUSR1)])
def test_signal_saves_and_exits_cleanly(shakespeare, tmp_path, reference, nproc, sig):
    """SLURM preemption: the signal reaches one rank (or all); every rank stops at the same step
    after a checkpoint, with exit status 0."""
    out = tmp_path / "run"
    run = dict(RESUME, **{"deepspeed.zero_stage": 1, "train.steps": 400})
    launcher = "python" if nproc == 1 else "torchrun"
    proc = start(shakespeare, out, nproc=nproc, launcher=launcher, **run)
    wait_for(lambda: any(r["step"] >= 2 for r in metrics(out)), proc)
    if nproc == 1:
        os.kill(proc.pid, sig)
    else:  # only one worker gets it
        import psutil

        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(c.cmdline())]
        assert len(workers) == 2
        workers[1].send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert f"received {sig.name}" in output or "stop signal on another rank" in output
    step = max(r["step"] for r in metrics(out))
    assert (out / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert (out / "checkpoints" / f"step_{step:08d}" / COMPLETE).is_file()


def test_resume_from_an_export_at_any_world_size_and_stage(shakespeare, tmp_path):
    """2 ranks (ZeRO-2) for 4 steps, export with optimizer state, then 4 more steps from it. At the
    same world size (even under ZeRO-3) this is bit-identical to 8 steps straight; at 3 ranks
    (ZeRO-3, the same global batch of 12 windows, rows cut at odd places) it is equal up to the
    rounding of another reduction order."""
    common = {"train.grad_clip": 0, "checkpoint.every": 0, "train.micro_batch": 6}
    train(shakespeare, tmp_path / "straight", nproc=2, **common, **{"deepspeed.zero_stage": 2, "train.steps": 8})
    train(shakespeare, tmp_path / "first", nproc=2, **common, **{"deepspeed.zero_stage": 2, "train.steps": 4})
    export = tmp_path / "first" / "final"
    assert (export / "trainer_state" / "optimizer.safetensors").is_file()
    straight = losses(tmp_path / "straight")

    same = train(shakespeare, tmp_path / "same", nproc=2, resume=str(export),
                 **common, **{"deepspeed.zero_stage": 3, "train.steps": 8})
    assert "at step 4" in same.stdout
    assert losses(tmp_path / "same") == {s: straight[s] for s in (5, 6, 7, 8)}
    assert_same_weights(tmp_path / "same" / "final", tmp_path / "straight" / "final")

    train(shakespeare, tmp_path / "three", nproc=3, resume=str(export),
          **dict(common, **{"deepspeed.zero_stage": 3, "train.steps": 8, "train.micro_batch": 4}))
    three = losses(tmp_path / "three")
    assert sorted(three) == [5, 6, 7, 8]
    for step in three:
        assert three[step] == pytest.approx(straight[step], rel=1e-5)
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "three" / "final")
    for k in a:
        assert ((a[k] - b[k]).norm() / a[k].norm()).item() < 1e-3, k


def test_same_world_size_checkpoint_is_required(shakespeare, tmp_path):
    train(shakespeare, tmp_path / "run", nproc=2, **{"train.steps": 3, "train.stop_at_step": 3})
    proc = train(shakespeare, tmp_path / "run", nproc=1, launcher="python", check=False, resume="auto",
                 **{"train.steps": 6})
    assert proc.returncode == 2
    assert "written by 2 ranks, this run has 1" in proc.stderr and "resume from an export" in proc.stderr


# --- branching -------------------------------------------------------------------------------------

def test_branching_shares_the_init(shakespeare, tmp_path):
    """seed.init alone fixes the initial weights: AdamW and Lion start from the same point; a run
    with init.from starts from the given export, whatever its own seed."""
    for opt in ("adamw", "lion"):
        train(shakespeare, tmp_path / opt, launcher="python", **{"optim.name": opt, "optim.lr": 1e-3,
              "train.steps": 2, "checkpoint.every": 0, "checkpoint.export_init": True, "seed.data": 7})
    init_a, init_l = tmp_path / "adamw" / "exports" / "step_00000000", tmp_path / "lion" / "exports" / "step_00000000"
    assert_same_weights(init_a, init_l)
    final_a, final_l = weights(tmp_path / "adamw" / "final"), weights(tmp_path / "lion" / "final")
    assert not torch.equal(final_a["transformer.h.0.mlp.c_fc.weight"], final_l["transformer.h.0.mlp.c_fc.weight"])

    train(shakespeare, tmp_path / "branch", launcher="python", **{"init.from": tmp_path / "adamw" / "final",
          "seed.init": 123, "train.steps": 2, "checkpoint.every": 0, "checkpoint.export_init": True})
    assert_same_weights(tmp_path / "branch" / "exports" / "step_00000000", tmp_path / "adamw" / "final")


# --- bad input -------------------------------------------------------------------------------------

def test_an_existing_run_is_never_overwritten(shakespeare, tmp_path):
    train(shakespeare, tmp_path / "run", launcher="python", **{"train.steps": 2})
    before = (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    proc = train(shakespeare, tmp_path / "run", launcher="python", check=False, **{"train.steps": 2})
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() == before


def test_diverging_loss_stops_with_a_clear_error(shakespeare, tmp_path):
    proc = train(shakespeare, tmp_path / "run", launcher="python", check=False,
                 **{"optim.lr": 1e6, "train.grad_clip": 0, "train.steps": 30, "checkpoint.every": 1,
                    "train.log_every": 100})  # the loss is checked before every checkpoint, logged or not
    assert proc.returncode == 2 and "training loss is nan" in proc.stderr.lower()
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    assert (tmp_path / "run" / "checkpoints" / latest / COMPLETE).is_file()
    assert not (tmp_path / "run" / "final").exists()


def test_bad_resume_path(shakespeare, tmp_path):
    proc = train(shakespeare, tmp_path / "run", launcher="python", check=False, resume=str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "neither a complete checkpoint" in proc.stderr


def test_resume_with_another_model_is_refused_before_loading(shakespeare, tmp_path):
    train(shakespeare, tmp_path / "run", launcher="python", **{"train.steps": 4, "train.stop_at_step": 2})
    proc = train(shakespeare, tmp_path / "run", launcher="python", check=False, resume="auto",
                 **{"train.steps": 4, "model.n_layer": 3})
    assert proc.returncode == 2
    assert "holds a model with other settings (n_layer)" in proc.stderr


def test_bf16_run_with_wandb_offline_resumes(shakespeare, tmp_path):
    """bf16 (DeepSpeed's bf16 optimizer, ZeRO-1), stopped and resumed; wandb offline logs to the same
    run id both times; the export holds fp32 master weights."""
    run = {"deepspeed.precision": "bf16", "deepspeed.zero_stage": 1, "train.steps": 3, "train.micro_batch": 2,
           "data.val_windows": 4, "data.eval_batch_size": 2, "wandb.mode": "offline", "wandb.tags": "[test, bf16]"}
    out = tmp_path / "run"
    train(shakespeare, out, nproc=2, **run, **{"train.stop_at_step": 2})
    run_id = (out / "wandb_run_id").read_text()
    resumed = train(shakespeare, out, nproc=2, resume="auto", **run)
    assert "at step 2" in resumed.stdout and (out / "wandb_run_id").read_text() == run_id
    assert sorted(losses(out)) == [1, 2, 3]
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert {t.dtype for t in weights(out / "final").values()} == {torch.float32}


def test_tied_embeddings_export_under_zero3(shakespeare, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "tied"
    train(shakespeare, out, nproc=2, **{"model.tie_embeddings": True, "deepspeed.zero_stage": 3, "train.steps": 3,
                                        "checkpoint.every": 3, "train.eval_every": 3})
    exported = weights(out / "final")
    assert "lm_head.weight" not in exported  # tied: HF re-ties it from wte
    oracle = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"))
    assert torch.equal(exported["transformer.wte.weight"], oracle["transformer.wte.weight"])
    model = GPT2LMHeadModel.from_pretrained(out / "final")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    (val,) = metrics(out, "val")
    assert hf_val_loss(out / "final", shakespeare) == pytest.approx(val["loss"], abs=1e-5)
