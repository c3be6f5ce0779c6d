"""launch/ scripts and shipped configs."""

import json
import subprocess

import pytest

from conftest import ROOT
from modeconn import config as config_lib
from modeconn.data.prepare import PrepareConfig
from modeconn.evaluate import EvaluateConfig
from modeconn.probe import ProbeConfig
from modeconn.theory.experiments import TheoryConfig
from modeconn.train import TrainConfig
from distributed import free_port
from train_runner import env, losses

CONFIG_KINDS = {"train": TrainConfig, "data": PrepareConfig, "eval": EvaluateConfig, "probe": ProbeConfig,
                "theory": TheoryConfig}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_load(path):
    if path.parent.name == "experiments":  # a spec: it loads and checks every config it names
        from modeconn.experiment.spec import load_spec

        assert load_spec(str(path)).name == path.stem
        return
    cfg = config_lib.load(CONFIG_KINDS[path.parent.name], str(path))
    assert config_lib.load(type(cfg), str(path)) == cfg


@pytest.mark.parametrize("script", sorted((ROOT / "launch").glob("*.s*")), ids=lambda p: p.name)
def test_launch_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_the_one_node_launch_scripts_run_the_same_job(shakespeare, tmp_path):
    """launch/torchrun.sh and launch/local_2rank.sh (the deepspeed launcher) each start a 2-rank
    ZeRO-2 run; both launchers give the ranks the same job: the same losses, bit for bit."""
    results = {}
    for script in ("torchrun.sh", "local_2rank.sh"):
        out = tmp_path / script
        proc = subprocess.run(
            ["bash", f"launch/{script}", "--config", "configs/train/tiny-adamw.yaml", f"--data.dir={shakespeare}",
             f"--out_dir={out}", "--train.steps=3", "--train.micro_batch=2", "--train.log_every=1",
             "--deepspeed.zero_stage=2", "--data.val_windows=4", "--data.eval_batch_size=2"],
            cwd=ROOT, env=env(NPROC_PER_NODE=2, MASTER_PORT=free_port()), capture_output=True, text=True,
            timeout=300)
        assert proc.returncode == 0, script + proc.stdout[-2000:] + proc.stderr[-3000:]
        assert json.loads((out / "final" / "modeconn_meta.json").read_text())["world_size"] == 2
        results[script] = losses(out)
    assert len(results["torchrun.sh"]) == 3 and results["torchrun.sh"] == results["local_2rank.sh"]


def test_two_node_launch_on_loopback(shakespeare, tmp_path):
    """Two DeepSpeed launcher invocations (--no_ssh, node ranks 0 and 1) form one 2-rank job that
    trains and writes complete checkpoints."""
    out = tmp_path / "two-nodes"
    proc = subprocess.run(
        ["bash", "launch/simulate_two_nodes.sh", "--config", "configs/train/tiny-adamw.yaml",
         f"--data.dir={shakespeare}", f"--out_dir={out}", "--train.steps=4", "--train.micro_batch=4",
         "--train.log_every=1", "--checkpoint.every=2", "--data.val_windows=8"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for step in (2, 4):
        tag = out / "checkpoints" / f"step_{step:08d}"
        assert json.loads((tag / "COMPLETE").read_text())["world_size"] == 2
        assert (tag / "trainer_rank00000.pt").is_file() and (tag / "trainer_rank00001.pt").is_file()
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert (out / "final" / "model.safetensors").is_file()
