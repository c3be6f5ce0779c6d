"""Align one GPT-2 checkpoint to another (heads, MLP units, optionally the residual stream); see modeconn/align.py."""

from modeconn.align import main
from modeconn.cli import run_cli

if __name__ == "__main__":
    run_cli(main)
