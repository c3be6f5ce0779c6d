"""Manifests: the size and sha256 of every file of a checkpoint or export, so damage is found
before the files are used.

`modeconn_manifest.json` sits in the directory it describes and lists the files under it by
relative path. It is written last, after every other file and before the directory is published
(an export's rename, a checkpoint's COMPLETE), so a directory with a manifest was complete when
it was written; a file that no longer matches it was damaged afterwards (a truncated copy, a
full disk, bit rot). Directories without a manifest (Hugging Face's, older ones) are read as
they are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

from modeconn.errors import CheckpointError

MANIFEST = "modeconn_manifest.json"
_FORMAT = "modeconn-manifest"
_CHUNK = 1 << 22


def file_entry(path: Path) -> dict:
    """{"bytes": size, "sha256": digest} of one file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def listed_files(directory: Path, skip: Iterable[str] = ()) -> list[str]:
    """Relative paths of the files under `directory` that a manifest covers (itself and `skip` left out)."""
    directory = Path(directory)
    left_out = {MANIFEST, *skip}
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).as_posix() not in left_out)


def write_manifest(directory: Path, entries: Optional[dict[str, dict]] = None, skip: Iterable[str] = ()) -> None:
    """Write the manifest of `directory`: `entries` if given (hashed elsewhere, e.g. by several
    ranks), else every file under it is hashed here."""
    directory = Path(directory)
    if entries is None:
        entries = {name: file_entry(directory / name) for name in listed_files(directory, skip)}
    text = json.dumps({"format": _FORMAT, "version": 1, "files": dict(sorted(entries.items()))}, indent=1)
    (directory / MANIFEST).write_text(text)


def read_manifest(directory: Path) -> Optional[dict[str, dict]]:
    """{relative path: entry} from the manifest of `directory`; None when it has none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != _FORMAT or not all({"bytes", "sha256"} <= set(e) for e in files.values()):
            raise ValueError("not a modeconn manifest")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged manifest ({e})") from None
    return files


def check_file(directory: Path, name: str, expected: dict, hashed: Optional[dict] = None) -> Optional[str]:
    """None if `directory/name` matches its manifest entry, else what is wrong with it (one phrase).
    `hashed`: its entry computed already (elsewhere), else it is computed here."""
    path = Path(directory) / name
    if not path.is_file():
        return f"{path}: missing (the manifest lists it)"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated or overwritten)"
    actual = hashed or file_entry(path)
    if actual["sha256"] != expected["sha256"]:
        return f"{path}: checksum differs from the manifest (the file was damaged or changed after it was written)"
    return None


def verify(directory: Path, names: Optional[Iterable[str]] = None) -> None:
    """Raise CheckpointError naming the first file of `directory` that does not match its manifest;
    `names` limits the check to those files (the ones about to be read). No manifest: nothing to check."""
    files = read_manifest(directory)
    if files is None:
        return
    for name in (sorted(files) if names is None else [n for n in names if n in files]):
        problem = check_file(directory, name, files[name])
        if problem:
            raise CheckpointError(problem)
