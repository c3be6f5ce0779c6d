"""Small GPTs trained in-process on a learnable synthetic task: each token is followed by one of
3 successors (10% uniform noise). Independent inits land in differently arranged solutions,
which is what alignment and path fitting are tested on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import write_token_dir
from modeconn.hf import save_hf
from modeconn.model import GPT, ModelConfig

VOCAB, BLOCK = 64, 32
CONFIG = ModelConfig.from_preset("tiny", n_embd=32, n_head=4, n_inner=128, vocab_size=VOCAB, block_size=BLOCK)


def bigram_sequences(seed: int, n: int) -> np.ndarray:
    successors = np.random.default_rng(0).integers(0, VOCAB, (VOCAB, 3))
    gen = np.random.default_rng(seed)
    x = np.zeros((n, BLOCK + 1), dtype=np.int64)
    x[:, 0] = gen.integers(0, VOCAB, n)
    for j in range(1, BLOCK + 1):
        follow = successors[x[:, j - 1], gen.integers(0, 3, n)]
        x[:, j] = np.where(gen.random(n) < 0.1, gen.integers(0, VOCAB, n), follow)
    return x


def train_runs(root: Path, seeds, steps: int = 250) -> tuple[dict[str, Path], Path]:
    """One export per seed (its init and data order), and a prepared data directory of the task."""
    torch.set_num_threads(1)
    runs = {}
    for seed in seeds:
        torch.manual_seed(seed)
        model = GPT(CONFIG)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        data = torch.from_numpy(bigram_sequences(seed + 10, steps * 32)).view(steps, 32, BLOCK + 1)
        for batch in data:
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs[f"seed{seed}"] = save_hf(model, CONFIG, root / f"seed{seed}", metadata={"optimizer": "adamw"})
    tokens = {split: [bigram_sequences(s, 512).reshape(-1).astype(np.uint16)] for split, s in (("train", 7), ("val", 99))}
    return runs, write_token_dir(root / "data", tokens)
