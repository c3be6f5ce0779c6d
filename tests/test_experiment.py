"""experiment.py: a miniature of the seed-study experiment end to end (tiny GPT-2s, a few steps,
AdamW and Muon x 2 inits x 2 data orders), killed once and run again; its emitted SLURM array
scripts run here (a fake srun, no sbatch), task by task; bad specs refused before anything runs;
the shipped specs plan and emit offline."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, assert_png
from entry_points import EntryPoints
from modeconn.errors import ConfigError
from modeconn.experiment.plan import STAGES, Plan
from modeconn.experiment.spec import load_spec
from modeconn.verdicts import verdict
from test_train import kill_tree
from train_runner import env

TRAIN = {"train": {"steps": 3, "micro_batch": 2, "log_every": 1, "eval_every": 0},
         "data": {"val_windows": 4, "eval_batch_size": 2}, "checkpoint": {"every": 2, "export_init": False}}


def mini_spec(root: Path, bpe_file: str, **changes) -> Path:
    (root / "prepare.yaml").write_text(yaml.safe_dump({"out_dir": str(root / "data"),
                                                       "tokenizer": {"bpe_file": bpe_file}}))
    spec = {"name": "mini", "out_dir": str(root / "out"), "report_dir": str(root / "report"),
            "datasets": {"shakespeare": {"prepare": str(root / "prepare.yaml"),
                                         "optimizers": {"muon": {"optim": {"lr": 0.02}}}}},
            "optimizers": {"adamw": {"config": str(ROOT / "configs/train/tiny-adamw.yaml"), "label": "AdamW"},
                           "muon": {"config": str(ROOT / "configs/train/tiny-muon.yaml"), "label": "Muon"}},
            "seeds": {"init": [0, 1], "data": [0, 1]},
            "pairs": {"data_order": True, "init": True, "cross": [["adamw", "muon"]], "align": {"residual": True}},
            "fits": {"pairs": ["init"], "config": str(ROOT / "configs/train/tiny-fit-chain.yaml"),
                     "overrides": {"train": {"steps": 2, "micro_batch": 2, "log_every": 1},
                                   "data": {"val_windows": 4, "eval_batch_size": 2}, "checkpoint": {"every": 0}}},
            "train": TRAIN,
            "probe": {"t_values": [0.0, 0.5, 1.0], "plots": False,
                      "data": {"val_windows": 4, "eval_batch_size": 2}},
            "launch": {"nodes": 1, "gpus_per_node": 2}}
    spec.update(changes)
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def entry():
    """experiment.py's quick commands (plan, emit, refuse) forked from one warm process."""
    with EntryPoints() as e:
        yield e


def quick(entry, *args):
    result = entry.run("experiment.py", *args)
    assert result.rc in (0, 2), result.stderr[-3000:]
    return result


def experiment(*args, check=True, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "experiment.py", *map(str, args)], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"experiment.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def finished(tmp_path_factory, bpe_file):
    """The miniature, killed once while its third run trains, then run again to the end."""
    root = tmp_path_factory.mktemp("experiment")
    spec = mini_spec(root, bpe_file)
    proc = subprocess.Popen([sys.executable, "experiment.py", "--config", str(spec)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log, deadline = root / "out" / "commands.jsonl", time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3) and time.time() < deadline:  # prepare, 2 runs
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    time.sleep(2.0)  # into the third run
    kill_tree(proc, signal.SIGKILL)
    proc.wait()
    finished_before = [json.loads(line)["command"] for line in log.read_text().splitlines()]
    again = experiment("--config", spec)
    return root, spec, finished_before, again


def test_a_killed_experiment_continues_and_repeats_no_finished_command(finished):
    root, spec, before, again = finished
    commands = [json.loads(line)["command"] for line in (root / "out" / "commands.jsonl").read_text().splitlines()]
    plan = Plan(load_spec(str(spec)), str(spec))
    every = [c.name for c in plan.commands()]
    assert len(before) >= 3 and commands[: len(before)] == before
    # every command finished exactly once (the report runs every time: once here)
    assert sorted(commands) == sorted(every), (commands, every)
    for name in before:
        assert f"{name}: done before" in again.stdout
    assert len(plan.runs) == 6 and len([p for p in plan.pairs if p.kind == "cross"]) == 3


def test_the_report_has_table_1_the_runs_and_the_spectral_figure(finished):
    root, spec, _, _ = finished
    report = (root / "report" / "report.md").read_text()
    results = json.loads((root / "report" / "results.json").read_text())
    table = results["datasets"]["shakespeare"]["table"]
    assert set(table) == {"adamw--adamw", "muon--muon", "adamw--muon"}
    assert table["adamw--adamw"]["linear"]["n"] == 2  # the data-order pair and the init pair
    assert table["adamw--adamw"]["aligned"]["n"] == 1 and table["adamw--adamw"]["chain"]["n"] == 1
    assert table["adamw--muon"]["linear"]["n"] == 3 and table["adamw--muon"]["aligned"]["n"] == 0
    summary = {}
    with open(root / "out" / "probe" / "shakespeare" / "summary.csv") as f:
        import csv

        summary = {r["path"]: float(r["loss_barrier"]) for r in csv.DictReader(f)}
    cross = [v for k, v in summary.items() if "adamw" in k.split("--")[0] and "muon" in k and ":" not in k]
    assert table["adamw--muon"]["linear"]["mean"] == pytest.approx(sum(cross) / len(cross))
    assert len(results["runs"]) == 6 and all(r["steps"] == 3 and r["val_loss"] > 0 for r in results["runs"])
    assert "| AdamW–AdamW linear |" in report and "![spectra](spectra_shakespeare.png)" in report
    for claim in results["claims"].values():  # each verdict is the one its measured parts give
        assert claim["parts"] and claim["verdict"] == verdict(list(claim["parts"].values())), claim
    assert_png(root / "report" / "spectra_shakespeare.png")
    assert_png(root / "report" / "loss_shakespeare.png")
    ranks = results["datasets"]["shakespeare"]["endpoint_stable_rank"]
    assert set(ranks) == {r.name for r in Plan(load_spec(str(spec)), str(spec)).runs}


def fake_cluster(bin_dir: Path, calls: Path) -> dict:
    """srun runs its command here (its options dropped); sbatch and scontrol record their calls."""
    bin_dir.mkdir(exist_ok=True)
    scripts = {
        "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "sbatch": f'#!/usr/bin/env bash\necho "sbatch $*" >> {calls}\necho $((RANDOM + 1000))\n',
        "scontrol": f'#!/usr/bin/env bash\nif [ "$1" = show ]; then echo localhost; else echo "scontrol $*" >> {calls}; fi\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="localhost", SLURM_NTASKS=1,
               SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_ARRAY_JOB_ID=77, SLURM_SUBMIT_DIR=ROOT)


def test_slurm_array_tasks_map_one_to_one_onto_the_commands_and_run(finished, tmp_path, entry):
    root, spec, _, _ = finished
    slurm = tmp_path / "slurm"
    assert quick(entry, "--config", spec, "--slurm", slurm).rc == 0
    plan = Plan(load_spec(str(spec)), str(spec), python="python")
    calls = tmp_path / "calls"
    cluster = fake_cluster(tmp_path / "bin", calls)
    # one run's final export and one pair's aligned checkpoints are removed: their tasks make them
    # again (train.py through srun, resuming its last checkpoint); every other task is done
    retrain, realign = plan.commands("train")[0], plan.commands("align")[0]
    shutil.rmtree(retrain.done.parent)
    shutil.rmtree(realign.done.parent.parent)  # the pair's folder: B aligned and A's canonical form
    for index, stage in enumerate(STAGES, 1):
        commands = plan.commands(stage)
        script = slurm / f"{index}_{stage}.sbatch"
        text = script.read_text()
        assert f"#SBATCH --array=0-{len(commands) - 1}" in text
        for task, command in enumerate(commands):
            out = subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                 env=dict(cluster, SLURM_ARRAY_TASK_ID=str(task)))
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
            if command in (retrain, realign) or command.done is None:
                assert f"task {task}: {command.shell()}" in out.stdout
            else:
                assert f"task {task}: done before ({command.done})" in out.stdout
    assert retrain.done.is_file() and realign.done.is_file()  # made again by their array tasks
    assert "train.py" in (slurm / "train.commands").read_text() and (slurm / "2_train.sbatch").read_text().count(
        "srun") == 1
    subprocess.run(["bash", str(slurm / "submit.sh")], cwd=ROOT, env=cluster, check=True, capture_output=True)
    submitted = calls.read_text().splitlines()
    assert [line.split()[-1] for line in submitted] == [f"{i}_{s}.sbatch" for i, s in enumerate(STAGES, 1)]
    assert "--dependency=afterok:" not in submitted[0] and all("--dependency=afterok:" in s for s in submitted[1:])
    deepspeed = (slurm / "deepspeed.sh").read_text()
    assert deepspeed.count("deepspeed --num_gpus=2 train.py") == len(plan.commands("train")) + len(plan.commands("fit"))


@pytest.mark.parametrize("change, named", [
    ({"optimizers": {"adamw": {"config": str(ROOT / "configs/train/tiny-adamw.yaml")},
                     "muon": {"config": str(ROOT / "configs/train/tiny-muon.yaml")}},
      "train": dict(TRAIN, optim={"name": "adamz"})}, "optim.name"),
    ({"pairs": {"cross": [["adamw", "lion"]]}}, "pairs.cross[0]: 'lion' is not an optimizer"),
    ({"datasets": {"shakespeare": {}}}, "datasets.shakespeare.prepare: no data config given"),
    ({"datasets": {"shakespeare": {"prepare": "configs/data/nowhere.yaml"}}}, "datasets.shakespeare.prepare"),
    ({"fits": {"pairs": ["init"], "config": ""}}, "fits.config"),
    ({"seeds": {"init": [0, 0], "data": [0]}}, "seeds.init: repeated"),
])
def test_a_bad_spec_is_refused_before_anything_runs(tmp_path, bpe_file, entry, change, named):
    spec = mini_spec(tmp_path, bpe_file, **change)
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_spec(str(spec))
    proc = quick(entry, "--config", spec)
    assert proc.rc == 2 and "Traceback" not in proc.stderr and named in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_specs_plan_and_emit_offline(path, tmp_path, entry):
    """Every shipped spec validates (its data, train, fit and probe configs load), prints its plan,
    and emits SLURM scripts whose commands each parse as their entry point's config."""
    from modeconn import config as config_lib
    from modeconn.data.prepare import PrepareConfig
    from modeconn.train import TrainConfig

    plan_text = quick(entry, "--config", path, "--plan").stdout
    spec = load_spec(str(path))
    plan = Plan(spec, str(path), python="python")
    assert plan_text.count("train.py") == len(plan.commands("train")) + len(plan.commands("fit"))
    slurm = tmp_path / "slurm"
    out = quick(entry, "--config", path, f"--slurm={slurm}", "--out_dir", tmp_path / "out")
    assert out.rc == 0 and "submit with" in out.stdout
    for command in plan.commands():
        argv = list(command.argv[2:])
        if command.argv[1] == "train.py" and command.stage == "train":
            config_lib.load(TrainConfig, *config_lib.parse_overrides(argv))
        elif command.argv[1] == "prepare.py":
            config_lib.load(PrepareConfig, *config_lib.parse_overrides(argv))
