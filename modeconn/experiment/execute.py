"""Running a plan: here, in order and resumably; or on a cluster, by emitting scripts for the
scheduler it already has (we never schedule ourselves).

- Local: each command in stage order, skipped when its done-file exists; a killed experiment,
  run again, continues (an interrupted train.py resumes its own checkpoint: --resume=auto).
- SLURM: one job-array script per stage (a task per command, its line in `<stage>.commands`),
  chained with --dependency=afterok by `submit.sh`. Train and fit tasks start one task per GPU
  with srun, as launch/slurm.sbatch does: SIGUSR1 before the time limit checkpoints, and the task
  requeues itself until its done-file exists. A task whose done-file exists exits at once.
- Other clusters: `deepspeed.sh`, the same commands in order, train.py under the deepspeed launcher.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

from modeconn.errors import ModeconnError
from modeconn.experiment.plan import STAGES, Command, Plan


def run_locally(plan: Plan) -> None:
    commands = plan.commands()
    plan.write_probe_configs()
    for i, command in enumerate(commands, 1):
        where = f"[{i}/{len(commands)}] {command.name}"
        if command.done is not None and command.done.exists():
            print(f"experiment: {where}: done before ({command.done}), skipped", flush=True)
            continue
        print(f"experiment: {where}: {command.shell()}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(command.argv).returncode
        if rc != 0:
            raise ModeconnError(f"{command.name} failed (exit status {rc}): {command.shell()}; fix it and run the "
                                f"experiment again: finished commands are not repeated")
        if command.done is not None and not command.done.exists():
            raise ModeconnError(f"{command.name} ended without writing {command.done}")
        seconds = time.perf_counter() - start
        with open(plan.log, "a") as f:
            f.write(json.dumps({"command": command.name, "seconds": round(seconds, 1)}) + "\n")
        print(f"experiment: {where}: finished in {seconds:.0f} s", flush=True)


_HEADER = """#!/usr/bin/env bash
# {what}, emitted by experiment.py for {name}: one array task per line of {commands}.
#SBATCH --job-name={name}-{stage}
#SBATCH --array=0-{last}
#SBATCH --output={logs}/{stage}-%A_%a.out
{resources}
set -euo pipefail
cd "${{SLURM_SUBMIT_DIR:-.}}"
line="$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "{commands}")"
done_file="${{line%%$'\\t'*}}"
command="${{line#*$'\\t'}}"
if [ "$done_file" != - ] && [ -e "$done_file" ]; then
  echo "task $SLURM_ARRAY_TASK_ID: done before ($done_file)"
  exit 0
fi
echo "task $SLURM_ARRAY_TASK_ID: $command"
"""

_ONE_PROCESS = """eval "$command"
"""

# As launch/slurm.sbatch: one task per GPU started by srun, ranks from SLURM's variables; a task cut
# short by the time limit or preemption (SIGUSR1: checkpoint, exit 0) requeues itself.
_RANKS = """export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${{MASTER_PORT:-$((29500 + SLURM_ARRAY_TASK_ID % 1000))}}"
export OMP_NUM_THREADS="${{SLURM_CPUS_PER_TASK:-1}}"
srun --kill-on-bad-exit=1 bash -c '
  export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
  eval "exec $0"' "$command"
if [ ! -e "$done_file" ]; then
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
"""


def emit_slurm(plan: Plan, folder: Path) -> list[Path]:
    """Write the stage scripts, their command lists, submit.sh and deepspeed.sh into `folder`."""
    folder = Path(folder)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    plan.write_probe_configs()
    spec, launch = plan.spec, plan.spec.launch
    written, submit = [], ["#!/usr/bin/env bash", f"# Submit {spec.name}'s stages in order, each after the "
                           f"last one succeeded (afterok).", "set -euo pipefail", 'cd "$(dirname "$0")"',
                           "after=''"]
    for index, stage in enumerate(STAGES, 1):
        commands = plan.commands(stage)
        if not commands:
            continue
        listing = folder / f"{stage}.commands"
        listing.write_text("".join(f"{c.done or '-'}\t{c.shell()}\n" for c in commands))  # '-': always runs
        distributed = any(c.distributed for c in commands)
        resources = [f"#SBATCH --nodes={launch.nodes if distributed else 1}",
                     f"#SBATCH --ntasks-per-node={launch.gpus_per_node if distributed else 1}",
                     f"#SBATCH --gpus-per-node={launch.gpus_per_node if distributed else 1}",
                     f"#SBATCH --cpus-per-task={launch.cpus_per_task}", f"#SBATCH --time={launch.time}"]
        if distributed:
            resources += ["#SBATCH --signal=USR1@180", "#SBATCH --requeue"]
        if launch.partition:
            resources.append(f"#SBATCH --partition={launch.partition}")
        if launch.account:
            resources.append(f"#SBATCH --account={launch.account}")
        script = folder / f"{index}_{stage}.sbatch"
        body = _HEADER.format(what=f"stage {stage} ({len(commands)} task(s))", name=spec.name, stage=stage,
                              commands=listing.resolve(), last=len(commands) - 1, logs=(folder / "logs").resolve(),
                              resources="\n".join(resources))
        script.write_text(body + (_RANKS.format() if distributed else _ONE_PROCESS))
        script.chmod(0o755)
        written += [listing, script]
        submit += [f"job=$(sbatch --parsable ${{after:+--dependency=afterok:$after}} {script.name})",
                   f'echo "{stage}: job $job ({len(commands)} task(s))"', "after=$job"]
    (folder / "submit.sh").write_text("\n".join(submit) + "\n")
    (folder / "submit.sh").chmod(0o755)
    gpus = launch.gpus_per_node
    lines = ["#!/usr/bin/env bash", f"# {spec.name} without SLURM: every command in order; train.py under the "
             f"deepspeed launcher on this node's {gpus} GPUs (add --hostfile for several nodes).", "set -euo pipefail"]
    for c in plan.commands():
        argv = list(c.argv)
        if c.distributed:
            argv = ["deepspeed", f"--num_gpus={gpus}", *argv[1:]]
        lines.append(f"[ -e {shlex.quote(str(c.done))} ] || {shlex.join(argv)}" if c.done else shlex.join(argv))
    (folder / "deepspeed.sh").write_text("\n".join(lines) + "\n")
    (folder / "deepspeed.sh").chmod(0o755)
    return written + [folder / "submit.sh", folder / "deepspeed.sh"]
