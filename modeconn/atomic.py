"""Writes that a reader never sees half-done: build under a temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from modeconn.errors import ModeconnError


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; on success it becomes `target`.

    An existing `target` is kept unless `overwrite`; it is replaced only once the new one is
    complete. On error the temporary directory is removed and `target` is untouched.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise ModeconnError(f"{target} already exists; refusing to overwrite it (choose another "
                            f"output path or pass overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode())
