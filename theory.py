"""Run the theory testbed (width sweep, SGD vs Adam, star paths, spectra) and write reports/theory/;
see modeconn/theory/."""

from modeconn.cli import run_cli
from modeconn.theory.report import main

if __name__ == "__main__":
    run_cli(main)
