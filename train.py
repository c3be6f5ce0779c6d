"""Train a GPT-2 under DeepSpeed ZeRO; see modeconn/train.py and README "Training".

    python train.py --config configs/train/tiny-adamw.yaml
    deepspeed --num_gpus 2 train.py --config configs/train/tiny-adamw.yaml --deepspeed.zero_stage=2
"""

from modeconn.cli import run_cli
from modeconn.train import main

if __name__ == "__main__":
    run_cli(main)
