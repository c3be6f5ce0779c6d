"""Writes that a reader never sees half-done: build under a temporary name, then rename.

A process killed while writing leaves only names a reader ignores: `.<name>.tmp-<id>` (a target
being built), `.<name>.old-<id>` (a target being replaced: the old one, moved aside just before
the new one takes its name) and `.<name>.retired-<id>` (a directory being deleted). The next
writer of that directory, holding its lock, calls `clean_leftovers` to finish or undo them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from modeconn.errors import ModeconnError
from modeconn.manifest import write_manifest

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|retired)-[0-9a-f]{8}$")


def _aside(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}")


def temporary_path(target: Path) -> Path:
    """A name beside `target` to build it under (renamed onto `target` when complete)."""
    return _aside(Path(target), "tmp")


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = False, manifest: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; on success it becomes `target`.

    An existing `target` is kept unless `overwrite`; it is replaced only once the new one is
    complete. With `manifest`, the sizes and checksums of its files are written into it last,
    before it takes its name (modeconn/manifest.py). On error the temporary directory is
    removed and `target` is untouched.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise ModeconnError(f"{target} already exists; refusing to overwrite it (choose another "
                            f"output path or pass overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    tmp.mkdir()
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        if target.exists():
            old = _aside(target, "old")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_dir(path: Path) -> None:
    """Delete a directory so that no half-deleted copy is ever seen under its name: it is renamed
    aside first (one atomic step), then removed."""
    aside = _aside(Path(path), "retired")
    Path(path).rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def move_aside_damaged(path: Path) -> Path:
    """Rename a damaged checkpoint or export out of the way (`<name>.damaged`, `.damaged-2`, ...),
    so that its step can be written again while the damaged files stay for inspection."""
    path = Path(path)
    aside, n = path.with_name(f"{path.name}.damaged"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{n}")
    path.rename(aside)
    return aside


def clean_leftovers(root: Path) -> list[str]:
    """Finish what killed writers left under `root`: targets being built are removed, deletions
    completed, and a target that was being replaced gets its old version back if the new one
    never took its name. Only for the holder of `root`'s lock. Returns what was done, one line each."""
    done = []
    root = Path(root)
    if not root.is_dir():
        return done
    for folder, dirs, files in os.walk(root, topdown=True):
        for name in sorted(dirs + files):
            match = _LEFTOVER.match(name)
            if not match:
                continue
            path, target = Path(folder) / name, Path(folder) / match["name"]
            if match["kind"] == "old" and not target.exists():
                path.rename(target)
                done.append(f"restored {target} (a replacement of it was interrupted)")
            else:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                done.append(f"removed {path} (left by an interrupted write)")
            if name in dirs:
                dirs.remove(name)
    return done


def atomic_write_bytes(target: Path, data: bytes) -> None:
    tmp = temporary_path(target)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode())
