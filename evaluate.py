"""Evaluate a GPT-2 (fresh or exported) on prepared validation windows; see modeconn/evaluate.py."""

from modeconn.cli import run_cli
from modeconn.evaluate import main

if __name__ == "__main__":
    run_cli(main)
