"""Training checkpoints: DeepSpeed's own files plus our per-rank state, made "latest" only when complete.

Layout under `<out_dir>/checkpoints/`:

    step_00000200/              DeepSpeed's files for that tag (model, ZeRO optimizer partitions)
        trainer_rank00000.pt    per rank: RNG states (python, numpy, torch, cuda), loader state
        COMPLETE                written by rank 0 after every rank finished (a barrier)
    latest                      the tag of the newest complete checkpoint, written last

A reader trusts only `latest` (and a tag with COMPLETE), so a run killed while writing resumes
from the previous checkpoint. `latest` has DeepSpeed's format, so DeepSpeed's zero_to_fp32.py
and `get_fp32_state_dict_from_zero_checkpoint` work on this directory as they are.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from modeconn.atomic import atomic_write_text
from modeconn.distributed import World, barrier
from modeconn.errors import CheckpointError

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(root: Path) -> Optional[str]:
    """The tag `latest` names, checked to be complete; None when there is no checkpoint yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (Path(root) / tag / COMPLETE).is_file():
        raise CheckpointError(f"{pointer} names {tag}, which is not a complete checkpoint")
    return tag


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, engine, root: Path, world: World, keep_last: int):
        self.engine, self.root, self.world, self.keep_last = engine, Path(root), world, keep_last

    def _rank_file(self, tag: str, rank: int) -> Path:
        return self.root / tag / f"trainer_rank{rank:05d}.pt"

    def save(self, step: int, client_state: dict, loader_state: dict, model_config: dict) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        tag = tag_for(step)
        start = time.perf_counter()
        self.engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        torch.save({"rng": rng_state(), "loader": loader_state, "rank": self.world.rank},
                   self._rank_file(tag, self.world.rank))
        barrier()  # every rank has written all its files
        if self.world.is_main:
            atomic_write_text(self.root / tag / COMPLETE, json.dumps(
                {"step": step, "world_size": self.world.world_size, "model": model_config,
                 "seconds": round(time.perf_counter() - start, 3)}))
            atomic_write_text(self.root / LATEST, tag)
            self._prune()
        barrier()
        return self.root / tag

    def _prune(self) -> None:
        complete = self.complete_tags()
        for tag in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(self.root / tag, ignore_errors=True)

    def complete_tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if TAG_PATTERN.match(p.name) and (p / COMPLETE).is_file())

    def latest(self) -> Optional[str]:
        return latest_tag(self.root)

    def remove_incomplete(self) -> list[str]:
        """Drop checkpoint directories a killed run left half-written (rank 0, before resuming)."""
        removed = []
        if self.world.is_main and self.root.is_dir():
            for p in self.root.iterdir():
                if TAG_PATTERN.match(p.name) and not (p / COMPLETE).is_file():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
        barrier()
        return removed

    def load(self, tag: str, model_config: dict) -> tuple[dict, dict]:
        """Restore engine (weights, optimizer partitions) and this rank's RNG. Returns
        (client_state, this rank's loader state)."""
        info = json.loads((self.root / tag / COMPLETE).read_text())
        if info["model"] != model_config:
            diff = [k for k in info["model"] if info["model"][k] != model_config.get(k)]
            raise CheckpointError(f"{self.root / tag} holds a model with other settings ({', '.join(diff)}); "
                                  f"resume with the model config it was trained with")
        if info["world_size"] != self.world.world_size:
            raise CheckpointError(
                f"{self.root / tag} was written by {info['world_size']} ranks, this run has {self.world.world_size}. "
                f"To continue at another world size, resume from an export with optimizer state "
                f"(--resume=<out_dir>/exports/step_N or <out_dir>/final), see README 'Resuming'")
        path, client_state = self.engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        rank_file = self._rank_file(tag, self.world.rank)
        if not rank_file.is_file():
            raise CheckpointError(f"{rank_file} is missing: the checkpoint {tag} is incomplete")
        mine = torch.load(rank_file, weights_only=False)
        set_rng_state(mine["rng"])
        return client_state, mine["loader"]
