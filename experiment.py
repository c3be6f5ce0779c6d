"""Reproduce the seed study's deliverable from one spec: runs, alignment and fits, probes, report;
see modeconn/experiment/ and README "Reproducing the seed study"."""

from modeconn.cli import run_cli
from modeconn.experiment import main

if __name__ == "__main__":
    run_cli(main)
