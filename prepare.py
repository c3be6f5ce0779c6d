"""Tokenize a corpus into GPT-2 token shards.

    python prepare.py --config configs/data/shakespeare.yaml
    python prepare.py --source.kind=hub --source.name=HuggingFaceFW/fineweb-edu \
        --source.subset=sample-10BT --out_dir=data/fineweb-edu-10B
"""

from modeconn.cli import run_cli
from modeconn.data.prepare import main

if __name__ == "__main__":
    run_cli(main)
