"""One writer per output directory.

train.py and probe.py lock their out_dir (`<out_dir>/modeconn.lock`); align.py, evaluate.py and
prepare.py, which write a directory that appears whole, lock its name (`<name>.lock` beside it).
The lock file is created exclusively (a hard link, which is atomic on NFS too) and names its
holder: host, pid, the process's start time, the command, and the SLURM job if any.

- Held by a live process: the second writer is refused at once, with the holder named.
- Held by a process of this host that no longer runs (killed, crashed; or a recycled pid, told
  apart by its start time): taken over, with a warning.
- Held by another host: its pid cannot be checked from here, so the writer is refused with the
  command that clears it. One exception: an earlier incarnation of the same SLURM job (a requeue
  after a node failure) whose heartbeat has stopped for STALE_AFTER seconds is taken over. The
  holder touches the lock every HEARTBEAT seconds, so an incarnation that still runs (a node cut
  off from the scheduler but not from the filesystem) keeps it.
A clean exit releases the lock; a directory the lock created and that stayed empty goes too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from modeconn.errors import ModeconnError

LOCK_NAME = "modeconn.lock"
HEARTBEAT = 10.0  # seconds between the holder's touches of its lock file
STALE_AFTER = 60.0  # a SLURM requeue takes over an earlier incarnation's lock silent this long


class LockedError(ModeconnError):
    pass


def _process_start(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:  # exists, but not ours to inspect: alive
        return -1.0


def _describe(holder: dict) -> str:
    started = holder.get("started_at") or "?"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"{holder.get('tool', '?')} on host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {started}{job}")


class OutputLock:
    """`with OutputLock(path, "train.py"):` holds the lock file `path` for the block."""

    def __init__(self, path: Path, tool: str):
        self.path, self.tool = Path(path), tool
        self.token = uuid.uuid4().hex
        self._created_dir: Optional[Path] = None
        self._stop: Optional[threading.Event] = None
        self.warnings: list[str] = []

    def _identity(self) -> dict:
        return {"tool": self.tool, "host": socket.gethostname(), "pid": os.getpid(),
                "process_start": _process_start(os.getpid()),
                "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"), "token": self.token}

    def acquire(self) -> "OutputLock":
        directory = self.path.parent
        if not directory.exists():
            top = directory
            while not top.parent.exists():
                top = top.parent
            directory.mkdir(parents=True)
            self._created_dir = top
        mine = self.path.with_name(f".{self.path.name}.{self.token[:8]}")
        mine.write_text(json.dumps(self._identity(), indent=1))
        try:
            for _ in range(3):  # a stale lock moved aside lets the next round take it
                try:
                    os.link(mine, self.path)
                    self._start_heartbeat()
                    return self
                except FileExistsError:
                    self._take_over_if_stale()
            raise LockedError(f"{self.path}: could not be taken (other processes keep taking it)")
        finally:
            mine.unlink(missing_ok=True)

    def _read_holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, OSError):
            return None

    def _take_over_if_stale(self) -> None:
        holder = self._read_holder()
        if holder == {}:  # released just now
            return
        if holder is None:  # unreadable: an old, damaged lock file
            reason = "it is not a readable lock file"
        else:
            reason = self._stale_reason(holder)
        aside = self.path.with_name(f".{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if self._read_json(aside) != holder:  # another process took over in between: give it back
            try:
                os.link(aside, self.path)
            finally:
                aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        message = f"warning: took over {self.path}: its holder ({_describe(holder or {})}) {reason}"
        self.warnings.append(message)
        print(message, file=sys.stderr, flush=True)

    @staticmethod
    def _read_json(path: Path) -> Optional[dict]:
        try:
            return json.loads(path.read_text())
        except (ValueError, OSError):
            return None

    def _stale_reason(self, holder: dict) -> str:
        """Why the holder no longer holds it; raises LockedError when it still may."""
        here = socket.gethostname()
        job = os.environ.get("SLURM_JOB_ID")
        try:
            silent = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            silent = 0.0
        earlier_incarnation = bool(job) and holder.get("slurm_job_id") == job and \
            holder.get("slurm_restart_count", "0") != os.environ.get("SLURM_RESTART_COUNT", "0")
        if earlier_incarnation and silent > STALE_AFTER:
            return f"was an earlier incarnation of this SLURM job (requeued), silent for {silent:.0f} s"
        if holder.get("host") != here:
            raise LockedError(
                f"{self.path} is held by {_describe(holder)}, last alive {silent:.0f} s ago. Another host's "
                f"processes cannot be checked from {here}: if that run is over, remove the lock "
                f"(rm {self.path}) and start again")
        pid = holder.get("pid")
        start = _process_start(pid) if isinstance(pid, int) else None
        recorded = holder.get("process_start")
        if start is None:
            return "is no longer running"
        if start != -1.0 and recorded is not None and abs(start - recorded) > 1.0:
            return f"is no longer running (pid {pid} is now another process)"
        raise LockedError(f"{self.path} is held by {_describe(holder)}, which is still running; "
                          f"wait for it to end, or stop it, or choose another output directory")

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()

        def beat() -> None:
            while not self._stop.wait(HEARTBEAT):
                try:
                    os.utime(self.path)
                except OSError:  # gone (released, or cleared by hand): nothing to keep alive
                    return

        threading.Thread(target=beat, name="lock-heartbeat", daemon=True).start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if (self._read_holder() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if self._created_dir is not None:  # nothing was written: leave no trace
            for folder in [self.path.parent, *self.path.parent.parents]:
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder == self._created_dir:
                    break

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *_) -> None:
        self.release()


def lock_for_directory(directory: Path, tool: str) -> OutputLock:
    """The lock of a directory that grows in place (a training run's or a probe's out_dir)."""
    return OutputLock(Path(directory) / LOCK_NAME, tool)


def lock_for_target(target: Path, tool: str) -> OutputLock:
    """The lock of a directory that is written elsewhere and renamed into place (its name + .lock)."""
    target = Path(target)
    return OutputLock(target.with_name(target.name + ".lock"), tool)
