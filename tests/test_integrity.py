"""The pieces that make runs survive kills and damage: manifests, interrupted atomic writes, and
the output lock (its refusals, takeovers and release)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from modeconn.atomic import atomic_dir, clean_leftovers, remove_dir
from modeconn.errors import CheckpointError
from modeconn.lock import STALE_AFTER, LockedError, OutputLock, lock_for_directory
from modeconn.manifest import MANIFEST, verify, write_manifest


def test_a_manifest_names_the_damaged_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"\x00" * 1000)
    (tmp_path / "sub" / "b.json").write_text('{"x": 1}')
    write_manifest(tmp_path)
    listed = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert sorted(listed) == ["a.bin", "sub/b.json"] and listed["a.bin"]["bytes"] == 1000
    verify(tmp_path)

    (tmp_path / "a.bin").write_bytes(b"\x00" * 999 + b"\x01")  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"a\.bin: checksum differs"):
        verify(tmp_path)
    verify(tmp_path, ["sub/b.json"])  # only the files about to be read are checked
    (tmp_path / "a.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match=r"a\.bin: 10 bytes, the manifest says 1000"):
        verify(tmp_path)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(CheckpointError, match=r"a\.bin: missing"):
        verify(tmp_path)
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(CheckpointError, match="damaged manifest"):
        verify(tmp_path)
    (tmp_path / MANIFEST).unlink()
    verify(tmp_path)  # no manifest (a Hugging Face directory): nothing to check


def test_interrupted_writes_are_finished_or_undone(tmp_path):
    """What a kill inside atomic_dir or remove_dir leaves behind, cleaned by the next writer."""
    target = tmp_path / "final"
    with atomic_dir(target, manifest=True) as tmp:
        (tmp / "model.safetensors").write_text("v1")
    verify(target)
    # killed while building a replacement: the half-built one goes, the target stays
    (tmp_path / ".final.tmp-0123abcd").mkdir()
    # killed between moving the old one aside and renaming the new one in: the old one comes back
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / ".step_00000004.old-89abcdef").mkdir()
    (tmp_path / "exports" / ".step_00000004.old-89abcdef" / "model.safetensors").write_text("v0")
    # killed while deleting a pruned checkpoint: finish deleting it
    (tmp_path / "checkpoints" / ".step_00000003.retired-00ff00ff").mkdir(parents=True)
    done = clean_leftovers(tmp_path)
    assert len(done) == 3
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []
    assert (tmp_path / "exports" / "step_00000004" / "model.safetensors").read_text() == "v0"
    assert (target / "model.safetensors").read_text() == "v1"
    remove_dir(target)
    assert not target.exists() and not list(tmp_path.glob(".final*"))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_refuses_a_second_writer_and_takes_over_a_dead_one(tmp_path, capsys):
    first = lock_for_directory(tmp_path / "run", "train.py").acquire()
    with pytest.raises(LockedError, match=rf"held by train\.py on host {socket.gethostname()}, pid {os.getpid()}"):
        lock_for_directory(tmp_path / "run", "probe.py").acquire()
    first.release()
    assert not (tmp_path / "run").exists()  # the lock made the directory, nothing else was written

    lock_file = tmp_path / "run" / "modeconn.lock"
    lock_file.parent.mkdir()
    lock_file.write_text(json.dumps({"tool": "train.py", "host": socket.gethostname(), "pid": dead_pid()}))
    with lock_for_directory(tmp_path / "run", "train.py") as taken:
        assert json.loads(lock_file.read_text())["token"] == taken.token
        assert "is no longer running" in capsys.readouterr().err
    assert not lock_file.exists() and (tmp_path / "run").is_dir()  # a directory that was there stays

    # a live pid that is another process than the holder (the pid was recycled): taken over too
    lock_file.write_text(json.dumps({"tool": "train.py", "host": socket.gethostname(), "pid": os.getpid(),
                                     "process_start": 1.0}))
    with lock_for_directory(tmp_path / "run", "train.py"):
        assert "is now another process" in capsys.readouterr().err
    lock_file.write_text("\x00garbage")  # a damaged lock file
    with lock_for_directory(tmp_path / "run", "train.py"):
        assert "not a readable lock file" in capsys.readouterr().err


def test_another_hosts_lock_is_kept_except_for_an_earlier_run_of_the_same_slurm_job(tmp_path, monkeypatch):
    lock_file = tmp_path / "modeconn.lock"
    holder = {"tool": "train.py", "host": "gpu-node-7", "pid": 99, "slurm_job_id": "5551", "slurm_restart_count": "0"}
    lock_file.write_text(json.dumps(holder))
    with pytest.raises(LockedError, match=rf"gpu-node-7.*rm {lock_file}"):
        OutputLock(lock_file, "train.py").acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "5551")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(LockedError):  # the same incarnation: a second launch inside the job
        OutputLock(lock_file, "train.py").acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued ...
    with pytest.raises(LockedError, match="last alive 0 s ago"):  # ... but the old incarnation still beats
        OutputLock(lock_file, "train.py").acquire()
    old = time.time() - STALE_AFTER - 5
    os.utime(lock_file, (old, old))  # its heartbeat stopped: the node died
    lock = OutputLock(lock_file, "train.py").acquire()
    assert "earlier incarnation of this SLURM job" in lock.warnings[0]
    lock.release()


def test_the_holder_keeps_its_lock_alive(tmp_path, monkeypatch):
    import modeconn.lock

    monkeypatch.setattr(modeconn.lock, "HEARTBEAT", 0.05)
    with lock_for_directory(tmp_path, "probe.py") as lock:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 1.0
