"""Run metrics: a console line, `metrics.jsonl` (one JSON object per event), and wandb. Rank 0 only."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from modeconn.atomic import atomic_write_text


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "modeconn"
    entity: Optional[str] = None
    run_name: Optional[str] = None  # default: the name of out_dir
    tags: list[str] = field(default_factory=list)


def start_wandb(out_dir: Path, wandb_cfg: WandbConfig, config: dict):
    """A wandb run for out_dir (None when disabled). Its id is kept in out_dir/wandb_run_id, so
    that a resumed job continues the same wandb run."""
    if wandb_cfg.mode == "disabled":
        return None
    import wandb

    id_file = out_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    atomic_write_text(id_file, run_id)
    return wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, id=run_id, resume="allow",
                      name=wandb_cfg.run_name or out_dir.resolve().name, tags=wandb_cfg.tags,
                      config=config, mode=wandb_cfg.mode, dir=str(out_dir))


class MetricsLogger:
    def __init__(self, out_dir: Path, wandb_cfg: WandbConfig, config: dict, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        self._drop_rows_after(resume_step)
        self.wandb = start_wandb(Path(out_dir), wandb_cfg, config)

    def _drop_rows_after(self, step: int) -> None:
        """On resume, rows logged after the checkpoint by the killed run would repeat: drop them,
        and a last line the kill cut short."""
        if not self.path.is_file():
            return
        text = self.path.read_text(errors="replace")
        lines = text.splitlines()
        keep = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
        if len(keep) != len(lines) or (text and not text.endswith("\n")):
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, kind: str, step: int, values: dict, console: Optional[str] = None) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if console:
            print(console, flush=True)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _step_of(line: str) -> Optional[int]:
    """The step of a metrics row; None for a line that is not one (cut short by a kill)."""
    try:
        row = json.loads(line)
        return int(row.get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return None


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


