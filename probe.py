"""Evaluate paths between checkpoints (loss, error, barriers, spectra); see modeconn/probe.py."""

from modeconn.cli import run_cli
from modeconn.probe import main

if __name__ == "__main__":
    run_cli(main)
