"""Training checkpoints: DeepSpeed's own files plus our per-rank state, made "latest" only when
complete, with a manifest that lets a resume tell an intact checkpoint from a damaged one.

Layout under `<out_dir>/checkpoints/`:

    step_00000200/              DeepSpeed's files for that tag (model, ZeRO optimizer partitions)
        trainer_rank00000.pt    per rank: RNG states (python, numpy, torch, cuda), loader state
        modeconn_manifest.json  size and sha256 of every file above (modeconn/manifest.py)
        COMPLETE                written by rank 0 after the manifest, once every rank finished
    latest                      the tag of the newest complete checkpoint, written last
    step_00000300.damaged       a complete checkpoint whose files no longer match its manifest,
                                moved aside by a resume (never deleted)

A kill at any moment leaves either a complete checkpoint or a directory without COMPLETE, which
the next run removes. `--resume=auto` takes the newest complete checkpoint whose files match
its manifest; a damaged newer one is moved aside with a warning naming the file. Old
checkpoints beyond `keep_last` are renamed before they are deleted, so a half-deleted one never
carries a step name. `latest` has DeepSpeed's format, so DeepSpeed's zero_to_fp32.py and
`get_fp32_state_dict_from_zero_checkpoint` work on this directory as they are.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from modeconn.atomic import atomic_write_text, move_aside_damaged, remove_dir
from modeconn.distributed import World, all_gather_objects, barrier, broadcast_object
from modeconn.errors import CheckpointError, ConfigError
from modeconn.manifest import MANIFEST, check_file, file_entry, listed_files, read_manifest, write_manifest

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
LATEST = "latest"


@dataclass
class CheckpointConfig:
    every: int = 100  # DeepSpeed checkpoint every N steps (and always at the end and on SIGTERM/SIGUSR1)
    keep_last: int = 2  # complete checkpoints kept; 2 or more leave one to fall back to if the newest is damaged
    export_every: int = 0  # safetensors export to exports/step_N every M steps; the final one always
    export_optimizer: bool = True  # put the world-size-independent optimizer state into the final export
    export_init: bool = False  # export the initial weights (exports/step_00000000): a common init is an endpoint too

    def __post_init__(self):
        if self.every < 0 or self.export_every < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint.every and export_every must be >= 0, keep_last >= 1")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _hash_spread(directory: Path, names: list[str], world: World) -> dict[str, dict]:
    """Size and sha256 of `names`, each rank hashing a share (a large checkpoint is many GB)."""
    mine = {name: file_entry(directory / name) for name in names[world.rank::world.world_size]}
    return {name: entry for part in all_gather_objects(mine) for name, entry in part.items()}


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
    """The checkpoints of one run: collective methods (every rank calls them), rank 0 writes."""

    def __init__(self, root: Path, world: World, keep_last: int):
        self.root, self.world, self.keep_last = Path(root), world, keep_last

    def _rank_file(self, tag: str, rank: int) -> Path:
        return self.root / tag / f"trainer_rank{rank:05d}.pt"

    def save(self, engine, step: int, client_state: dict, loader_state: dict, model_config: dict) -> Path:
        """Returns the checkpoint directory."""
        tag = tag_for(step)
        start = time.perf_counter()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        torch.save({"rng": rng_state(), "loader": loader_state, "rank": self.world.rank},
                   self._rank_file(tag, self.world.rank))
        barrier()  # every rank has written all its files
        names = broadcast_object(listed_files(self.root / tag, skip=(COMPLETE,)) if self.world.is_main else None)
        entries = _hash_spread(self.root / tag, names, self.world)
        if self.world.is_main:
            write_manifest(self.root / tag, entries)
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
            remove_dir(self.root / tag)

    def complete_tags(self) -> list[str]:
        """Tags with COMPLETE, oldest first (this process's view of the directory)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if TAG_PATTERN.match(p.name) and (p / COMPLETE).is_file())

    def latest(self) -> Optional[str]:
        """The tag `latest` names, if that checkpoint is complete."""
        pointer = self.root / LATEST
        tag = pointer.read_text().strip() if pointer.is_file() else None
        return tag if tag and (self.root / tag / COMPLETE).is_file() else None

    def remove_incomplete(self) -> list[str]:
        """Drop checkpoint directories a killed run left half-written (before resuming; the caller
        holds out_dir's lock, so no other run is writing one)."""
        removed = []
        if self.world.is_main and self.root.is_dir():
            for p in self.root.iterdir():
                if TAG_PATTERN.match(p.name) and not (p / COMPLETE).is_file():
                    remove_dir(p)
                    removed.append(p.name)
        barrier()
        return removed

    # --- choosing what to resume from ----------------------------------------------------------------

    def _records(self, tag: str) -> tuple[Optional[str], Optional[dict]]:
        """(what is wrong with COMPLETE or the manifest, or None; the manifest's files, or None)."""
        where = self.root / tag
        try:
            json.loads((where / COMPLETE).read_text())
            return None, read_manifest(where)
        except ValueError as e:
            return f"{where / COMPLETE}: not valid JSON ({e})", None
        except CheckpointError as e:
            return str(e), None

    def damage(self, tag: str) -> Optional[str]:
        """None if checkpoint `tag` is intact, else the first thing wrong with it (naming the file)."""
        problem, files = broadcast_object(self._records(tag) if self.world.is_main else None)
        if problem is not None:
            return problem
        if files is None:  # written before checkpoints had manifests
            if self.world.is_main:
                print(f"warning: {self.root / tag} has no {MANIFEST}; resuming from it unverified", file=sys.stderr,
                      flush=True)
            return None
        names = sorted(files)
        mine = [check_file(self.root / tag, name, files[name]) for name in names[self.world.rank::self.world.world_size]]
        found = [p for part in all_gather_objects(mine) for p in part if p]
        return min(found) if found else None

    def resume_point(self) -> Optional[str]:
        """The newest intact complete checkpoint (None when there is none at all). Damaged newer
        ones are moved aside, named in a warning. If every checkpoint is damaged, CheckpointError,
        and nothing is moved (a rerun must not mistake the run for a fresh one)."""
        tags = broadcast_object(self.complete_tags() if self.world.is_main else None)
        damaged = []
        for tag in reversed(tags):
            problem = self.damage(tag)
            if problem is not None:
                damaged.append((tag, problem))
                continue
            if self.world.is_main:
                for bad, why in damaged:
                    aside = move_aside_damaged(self.root / bad)
                    print(f"warning: checkpoint {self.root / bad} is damaged ({why}); kept as {aside}; resuming "
                          f"from {tag}", file=sys.stderr, flush=True)
                if self.latest() != tag:
                    atomic_write_text(self.root / LATEST, tag)  # DeepSpeed's tools read the intact one too
            barrier()
            return tag
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {self.root} to resume from: "
                                  + "; ".join(f"{tag}: {why}" for tag, why in damaged))
        return None

    def load(self, engine, tag: str, model_config: dict) -> tuple[dict, dict]:
        """Restore engine (weights, optimizer partitions) and this rank's RNG. Returns
        (client_state, this rank's loader state)."""
        where = self.root / tag
        info = json.loads((where / COMPLETE).read_text())
        if info["model"] != model_config:
            diff = [k for k in info["model"] if info["model"][k] != model_config.get(k)]
            raise CheckpointError(f"{where} holds a model with other settings ({', '.join(diff)}); "
                                  f"resume with the model config it was trained with")
        if info["world_size"] != self.world.world_size:
            raise CheckpointError(
                f"{where} was written by {info['world_size']} ranks, this run has {self.world.world_size}. "
                f"To continue at another world size, resume from an export with optimizer state "
                f"(--resume=<out_dir>/exports/step_N or <out_dir>/final), see README 'Resuming'")
        rank_file = self._rank_file(tag, self.world.rank)
        try:
            path, client_state = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=False)
            mine = torch.load(rank_file, weights_only=False)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, ValueError) as e:
            raise CheckpointError(f"{where}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                                  ) from None
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {where}")
        set_rng_state(mine["rng"])
        return client_state, mine["loader"]
