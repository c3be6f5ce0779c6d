"""Experiments: one spec declares the seed study's runs, pairs, fits, probes and report; one
command plans, runs (here, resumably) or emits them (SLURM), and writes the report.

    python experiment.py --config configs/experiments/shakespeare-small.yaml            # run here
    python experiment.py --config configs/experiments/shakespeare-small.yaml --plan     # print the commands
    python experiment.py --config configs/experiments/paper-small-tinystories.yaml --slurm out/slurm
    python experiment.py --config ... --report                                           # the report alone

Further `--key=value` arguments override keys of the spec (e.g. --seeds.init=[0,1]).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from modeconn.errors import ConfigError
from modeconn.experiment.execute import emit_slurm, run_locally
from modeconn.experiment.plan import STAGES, Plan
from modeconn.experiment.report import Report
from modeconn.experiment.spec import load_spec
from modeconn.lock import lock_for_directory


def _take(argv: list[str], flag: str, with_value: bool = False):
    """Remove `--flag` (or `--flag VALUE`, `--flag=VALUE`) from argv; its value, True, or None."""
    for i, arg in enumerate(argv):
        if arg == flag:
            del argv[i]
            return argv.pop(i) if with_value else True
        if with_value and arg.startswith(flag + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def main(argv=None) -> None:
    from modeconn import config as config_lib

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        sys.exit(0)
    show_plan, report_only = _take(argv, "--plan"), _take(argv, "--report")
    slurm = _take(argv, "--slurm", with_value=True)
    config_path, overrides = config_lib.parse_overrides(argv)
    if config_path is None:
        raise ConfigError("experiment.py needs --config <spec.yaml> (see configs/experiments/)")
    spec = load_spec(config_path, overrides)
    plan = Plan(spec, config_path, python="python" if slurm or show_plan else sys.executable)
    if show_plan:
        for stage in STAGES:
            commands = plan.commands(stage)
            if commands:
                print(f"# {stage} ({len(commands)})")
                print("\n".join(c.shell() for c in commands))
        return
    if slurm:
        written = emit_slurm(plan, Path(slurm))
        print(f"wrote {len(written)} files to {slurm}; submit with: bash {Path(slurm) / 'submit.sh'}")
        return
    if report_only:
        out = Report(plan).write()
        print(f"wrote {out / 'report.md'}")
        return
    start = time.perf_counter()
    with lock_for_directory(spec.out, "experiment.py"):
        run_locally(plan)
    print(f"experiment {spec.name}: every command finished ({(time.perf_counter() - start) / 60:.1f} min this time)")
